//! Node identities: key generation, certificate pins, loading PEM files.
//!
//! A node's identity is a self-signed certificate; trust comes only from its pin
//! (`sha256:<hex>` of the DER certificate) written in the peer's resource file, so there is no CA,
//! no expiry check and no name check to get wrong.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Errors around key and certificate files.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: already exists; refusing to overwrite a node identity (pass --force to replace it, and update the pin in the peer's resource file)")]
    Exists { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: no usable PEM {what} in the file ({detail}); generate one with `twinblk keygen`"
    )]
    Pem {
        path: PathBuf,
        what: &'static str,
        detail: String,
    },
    #[error("generating a key for {name:?}: {detail}")]
    Generate { name: String, detail: String },
}

/// The identity of one node, loaded from its PEM files.
#[derive(Debug)]
pub struct Identity {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            cert: self.cert.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    /// Loads `cert` (first certificate in the PEM file) and `key` (PEM private key).
    pub fn load(cert: &Path, key: &Path) -> Result<Identity, KeyError> {
        Ok(Identity {
            cert: load_cert(cert)?,
            key: load_key(key)?,
        })
    }

    /// The pin of this identity's certificate.
    pub fn pin(&self) -> String {
        pin_of_der(&self.cert)
    }
}

/// Generates an ECDSA P-256 key and a self-signed certificate (CN and SAN = `name`), writes
/// `out_dir/NAME.key` (mode 0600) and `out_dir/NAME.crt` as PEM, and returns
/// `(key_path, crt_path, pin)`. Existing files are left alone unless `overwrite`.
pub fn keygen(
    name: &str,
    out_dir: &Path,
    overwrite: bool,
) -> Result<(PathBuf, PathBuf, String), KeyError> {
    let gen_err = |e: rcgen::Error| KeyError::Generate {
        name: name.to_string(),
        detail: e.to_string(),
    };
    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).map_err(gen_err)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let cert = params.self_signed(&key_pair).map_err(gen_err)?;

    let key_path = out_dir.join(format!("{name}.key"));
    let crt_path = out_dir.join(format!("{name}.crt"));
    if !overwrite {
        for p in [&key_path, &crt_path] {
            if p.exists() {
                return Err(KeyError::Exists { path: p.clone() });
            }
        }
    }
    write_file(
        &key_path,
        key_pair.serialize_pem().as_bytes(),
        0o600,
        overwrite,
    )?;
    write_file(&crt_path, cert.pem().as_bytes(), 0o644, overwrite)?;
    Ok((key_path, crt_path, pin_of_der(cert.der())))
}

fn write_file(path: &Path, data: &[u8], mode: u32, overwrite: bool) -> Result<(), KeyError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut opts = OpenOptions::new();
    opts.write(true).mode(mode);
    if overwrite {
        opts.create(true).truncate(true);
    } else {
        // create_new: a file that appeared since the exists() check is still never clobbered.
        opts.create_new(true);
    }
    let mut f = opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            KeyError::Exists {
                path: path.to_path_buf(),
            }
        } else {
            io(e)
        }
    })?;
    // The mode given to open() only applies to new files; an overwritten key must be 0600 too.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)
}

/// `sha256:<64 lowercase hex>` over the DER bytes of a certificate.
pub fn pin_of_der(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let mut s = String::with_capacity(7 + 64);
    s.push_str("sha256:");
    for b in digest.as_ref() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The pin of the first certificate in a PEM file.
pub fn pin_of_cert_file(path: &Path) -> Result<String, KeyError> {
    Ok(pin_of_der(&load_cert(path)?))
}

/// The first certificate in a PEM file.
pub fn load_cert(path: &Path) -> Result<CertificateDer<'static>, KeyError> {
    let pem = std::fs::read(path).map_err(|source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    CertificateDer::from_pem_slice(&pem).map_err(|e| KeyError::Pem {
        path: path.to_path_buf(),
        what: "certificate",
        detail: e.to_string(),
    })
}

/// The private key in a PEM file (PKCS#8, SEC1 or PKCS#1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, KeyError> {
    let pem = std::fs::read(path).map_err(|source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| KeyError::Pem {
        path: path.to_path_buf(),
        what: "private key",
        detail: e.to_string(),
    })
}
