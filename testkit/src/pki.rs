//! Certificates for the TLS tests: a CA, and certificates it signs, written as PEM files
//! the way an operator would hand them to `cache-node --tls-cert` or `cache-agent --ca`.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A certificate authority; its certificate is at [`Ca::cert`].
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pub cert: PathBuf,
}

/// A certificate and its key, as files.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// When an issued certificate is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validity {
    /// From a day ago for ten years.
    Current,
    /// Only during 2020.
    Expired,
}

impl Ca {
    /// A new CA named `name`, its certificate written to `dir/NAME-ca.pem`.
    pub fn new(dir: &Path, name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("CA certificate");
        let cert = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&cert, issuer.pem()).expect("writing the CA certificate");
        Self { issuer, cert }
    }

    /// A certificate for `names` (DNS names or IP addresses), good for serving and for
    /// presenting as a client, written to `dir/FILE.pem` and `dir/FILE-key.pem`.
    pub fn issue(&self, dir: &Path, file: &str, names: &[&str], validity: Validity) -> Issued {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("certificate params");
        params.distinguished_name.push(DnType::CommonName, file);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        match validity {
            Validity::Current => {
                let now = rcgen::date_time_ymd(2000, 1, 1)
                    + (std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH + YEARS_1970_TO_2000)
                        .expect("a clock after 2000"));
                params.not_before = now - std::time::Duration::from_secs(86_400);
                params.not_after = now + std::time::Duration::from_secs(10 * 365 * 86_400);
            }
            Validity::Expired => {
                params.not_before = rcgen::date_time_ymd(2020, 1, 1);
                params.not_after = rcgen::date_time_ymd(2020, 12, 31);
            }
        }
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("signing");
        let issued = Issued {
            cert: dir.join(format!("{file}.pem")),
            key: dir.join(format!("{file}-key.pem")),
        };
        write_atomically(&issued.cert, cert.pem().as_bytes());
        write_atomically(&issued.key, key.serialize_pem().as_bytes());
        issued
    }
}

/// 1970-01-01 to 2000-01-01.
const YEARS_1970_TO_2000: std::time::Duration = std::time::Duration::from_secs(946_684_800);

/// Writes `bytes` to `path` by renaming a finished file over it, as a secret mount does,
/// so that a reader never sees half of it.
pub fn write_atomically(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).expect("writing a certificate file");
    std::fs::rename(&tmp, path).expect("renaming a certificate file");
}

/// Replaces `to`'s certificate and key with `from`'s (a rotation, as an operator does it).
pub fn rotate(from: &Issued, to: &Issued) {
    for (src, dst) in [(&from.cert, &to.cert), (&from.key, &to.key)] {
        let bytes = std::fs::read(src).expect("reading the new certificate");
        write_atomically(dst, &bytes);
    }
}
