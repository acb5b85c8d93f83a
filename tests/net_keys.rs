//! Key generation and certificate pins, on real files.

use std::os::unix::fs::PermissionsExt;
use twinblk::net::{keygen, load_cert, pin_of_cert_file, pin_of_der, Identity, KeyError};

#[test]
fn keygen_writes_private_key_and_cert_and_returns_its_pin() {
    let dir = tempfile::tempdir().unwrap();
    let (key, crt, pin) = keygen("alpha", dir.path(), false).unwrap();
    assert_eq!(key, dir.path().join("alpha.key"));
    assert_eq!(crt, dir.path().join("alpha.crt"));
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(std::fs::read_to_string(&key)
        .unwrap()
        .starts_with("-----BEGIN PRIVATE KEY-----"));
    assert!(std::fs::read_to_string(&crt)
        .unwrap()
        .starts_with("-----BEGIN CERTIFICATE-----"));

    assert!(pin.starts_with("sha256:"));
    assert_eq!(pin.len(), 7 + 64);
    assert_eq!(pin_of_cert_file(&crt).unwrap(), pin);
    // The pin is SHA-256 over the DER certificate, independently computed here.
    let der = load_cert(&crt).unwrap();
    let digest = ring::digest::digest(&ring::digest::SHA256, &der);
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(pin, format!("sha256:{hex}"));
    assert_eq!(pin_of_der(&der), pin);

    let id = Identity::load(&crt, &key).unwrap();
    assert_eq!(id.pin(), pin);
}

#[test]
fn keygen_refuses_to_overwrite_unless_asked() {
    let dir = tempfile::tempdir().unwrap();
    let (key, crt, pin1) = keygen("beta", dir.path(), false).unwrap();
    let before = std::fs::read(&key).unwrap();
    let e = keygen("beta", dir.path(), false).unwrap_err();
    assert!(matches!(e, KeyError::Exists { .. }), "{e}");
    assert!(e.to_string().contains("beta.key"), "{e}");
    assert_eq!(
        std::fs::read(&key).unwrap(),
        before,
        "existing key untouched"
    );

    // Only the cert exists (key lost): still refused, naming the cert.
    std::fs::remove_file(&key).unwrap();
    let e = keygen("beta", dir.path(), false).unwrap_err().to_string();
    assert!(e.contains("beta.crt"), "{e}");

    std::fs::set_permissions(&crt, std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::write(&key, "old").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (key, crt, pin2) = keygen("beta", dir.path(), true).unwrap();
    assert_ne!(pin1, pin2, "a new key makes a new cert");
    assert_eq!(pin_of_cert_file(&crt).unwrap(), pin2);
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn unreadable_or_garbage_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.crt");
    let e = pin_of_cert_file(&missing).unwrap_err().to_string();
    assert!(e.contains("nope.crt"), "{e}");
    let junk = dir.path().join("junk.crt");
    std::fs::write(&junk, "not a certificate").unwrap();
    let e = pin_of_cert_file(&junk).unwrap_err().to_string();
    assert!(e.contains("junk.crt") && e.contains("certificate"), "{e}");
    let e = Identity::load(&junk, &junk).unwrap_err().to_string();
    assert!(e.contains("junk.crt"), "{e}");
}
