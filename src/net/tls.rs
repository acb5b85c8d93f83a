//! Mutual TLS 1.3 with pinned certificates, for QUIC.
//!
//! Each side presents its own self-signed certificate and accepts exactly one peer certificate:
//! the one whose SHA-256 over DER equals the pin from the resource file. The handshake signature
//! is still verified against that certificate, so holding a copy of the peer's (public) cert is
//! not enough to impersonate it. Session resumption and 0-RTT are off so that every connection
//! runs the verifier: a resumed session would skip it, and a pin change in the file must take
//! effect on the next connect.

use super::keys::{pin_of_der, Identity};
use super::NetError;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use std::sync::{Arc, Mutex};

/// Where this node's pin of its peer's certificate comes from: the resource file's
/// `node.PEER.pin`, or the certificate file `node.PEER.cert` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    Pin,
    Cert(std::path::PathBuf),
}

/// The certificate a peer presented is not the pinned one. The text names the resource-file
/// key the pin came from and the fix.
#[derive(thiserror::Error)]
pub struct PinMismatch {
    pub local: String,
    pub peer: String,
    /// `"server"` (this node dialed it) or `"client"` (it dialed this node).
    pub peer_role: &'static str,
    pub seen: String,
    pub expected: String,
    pub pin_from: PinSource,
}

impl std::fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let PinMismatch {
            local,
            peer,
            peer_role,
            seen,
            expected,
            pin_from,
        } = self;
        let how = if *peer_role == "server" {
            format!("dialed by {local}")
        } else {
            format!("dialing {local}")
        };
        write!(
            f,
            "peer {peer} ({how}) presented a certificate with pin {seen}, which does not match "
        )?;
        match pin_from {
            PinSource::Cert(path) => write!(
                f,
                "node.{peer}.cert ({}, pin {expected}) in {local}'s resource file: copy {peer}'s \
                 .crt (written by `twinblk keygen --name {peer}` on {peer}) there, or set \
                 node.{peer}.pin to the pin keygen printed on {peer}",
                path.display()
            )?,
            PinSource::Pin => write!(
                f,
                "node.{peer}.pin ({expected}) in {local}'s resource file: set it to the pin \
                 `twinblk keygen --name {peer}` printed on {peer}, or remove it and copy {peer}'s \
                 .crt to node.{peer}.cert"
            )?,
        }
        write!(
            f,
            "; if {peer} kept its key, something else claims to be {peer}"
        )
    }
}

// rustls shows a verifier's error with `{:?}`; make that the readable text (the link strips
// rustls's own `Other(OtherError(…))` around it: `CloseReason`).
impl std::fmt::Debug for PinMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// Where the last refused certificate is recorded, so `status` can show it.
pub type AuthLog = Arc<Mutex<Option<String>>>;

#[derive(Debug)]
pub(crate) struct PinnedVerifier {
    local: String,
    peer: String,
    pin: String,
    source: PinSource,
    algs: WebPkiSupportedAlgorithms,
    log: AuthLog,
}

impl PinnedVerifier {
    fn check(
        &self,
        cert: &CertificateDer<'_>,
        peer_role: &'static str,
    ) -> Result<(), rustls::Error> {
        let seen = pin_of_der(cert);
        if seen == self.pin {
            return Ok(());
        }
        let err = PinMismatch {
            local: self.local.clone(),
            peer: self.peer.clone(),
            peer_role,
            seen,
            expected: self.pin.clone(),
            pin_from: self.source.clone(),
        };
        tracing::warn!(peer = %self.peer, "refusing peer: {err}");
        if let Ok(mut slot) = self.log.lock() {
            *slot = Some(err.to_string());
        }
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(err)),
        )))
    }

    fn verify13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The cert was already compared with the pin; this proves the peer holds its key.
        verify_tls13_signature(message, cert, dss, &self.algs)
    }
}

fn tls12_refused() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls13RequiredForQuic,
    ))
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, "server")
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

impl ClientCertVerifier for PinnedVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, "client")
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn verifier(
    local: &str,
    peer: &str,
    pin: &str,
    source: &PinSource,
    log: &AuthLog,
) -> Arc<PinnedVerifier> {
    Arc::new(PinnedVerifier {
        local: local.to_string(),
        peer: peer.to_string(),
        pin: pin.to_ascii_lowercase(),
        source: source.clone(),
        algs: provider().signature_verification_algorithms,
        log: log.clone(),
    })
}

fn tls_err(what: &str) -> impl Fn(rustls::Error) -> NetError + '_ {
    move |e| NetError::TlsSetup(format!("{what}: {e}"))
}

/// rustls client config for dialing `peer`.
pub(crate) fn client_config(
    id: &Identity,
    local: &str,
    peer: &str,
    pin: &str,
    source: &PinSource,
    alpn: &[u8],
    log: &AuthLog,
) -> Result<rustls::ClientConfig, NetError> {
    let mut c = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err("TLS 1.3 client"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier(local, peer, pin, source, log))
        .with_client_auth_cert(vec![id.cert.clone()], id.key.clone_key())
        .map_err(tls_err("our certificate/key"))?;
    c.alpn_protocols = vec![alpn.to_vec()];
    c.resumption = rustls::client::Resumption::disabled();
    c.enable_early_data = false;
    Ok(c)
}

/// rustls server config accepting only `peer`.
pub(crate) fn server_config(
    id: &Identity,
    local: &str,
    peer: &str,
    pin: &str,
    source: &PinSource,
    alpn: &[u8],
    log: &AuthLog,
) -> Result<rustls::ServerConfig, NetError> {
    let mut s = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err("TLS 1.3 server"))?
        .with_client_cert_verifier(verifier(local, peer, pin, source, log))
        .with_single_cert(vec![id.cert.clone()], id.key.clone_key())
        .map_err(tls_err("our certificate/key"))?;
    s.alpn_protocols = vec![alpn.to_vec()];
    s.send_tls13_tickets = 0;
    s.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    s.max_early_data_size = 0;
    Ok(s)
}
