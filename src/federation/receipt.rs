//! Signed receipts: the receiver's proof, checkable by the sender, of what it stored.
//!
//! The receiver signs the receipt fields with its site certificate key (ECDSA P-256, SHA-256); the
//! sender verifies the signature with the public key of the certificate the receiver presented in
//! the mutual-TLS handshake. There is no second PKI.

use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING};
use rustls_pki_types::CertificateDer;

use super::proto::Receipt;

/// The exact bytes a receipt signature covers.
pub fn signed_bytes(r: &Receipt) -> Vec<u8> {
    format!(
        "pacs-broker-receipt-v1\n{}\n{}\n{}\n{}\n{}\n{}\n",
        r.transfer_id,
        r.receiver_site,
        r.study_token,
        r.instances_stored,
        r.instances_already_held,
        hex::encode(&r.study_digest)
    )
    .into_bytes()
}

/// Signs receipts with the site's PKCS#8 ECDSA P-256 key.
pub struct ReceiptSigner {
    key: Option<EcdsaKeyPair>,
    rng: SystemRandom,
}

impl ReceiptSigner {
    /// A signer for a PKCS#8 key; a key of another kind yields unsigned receipts (logged once).
    pub fn new(pkcs8: &[u8]) -> Self {
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8, &rng).ok();
        if key.is_none() {
            tracing::warn!("site key is not an ECDSA P-256 PKCS#8 key: receipts will be unsigned");
        }
        ReceiptSigner { key, rng }
    }

    /// Fills in `r.signature`.
    pub fn sign(&self, r: &mut Receipt) {
        r.signature = match &self.key {
            Some(k) => k
                .sign(&self.rng, &signed_bytes(r))
                .map(|s| s.as_ref().to_vec())
                .unwrap_or_default(),
            None => Vec::new(),
        };
    }
}

/// Checks a receipt's signature against the receiver's certificate.
pub fn verify(r: &Receipt, receiver_cert: &CertificateDer<'_>) -> bool {
    let Ok((_, x)) = x509_parser::parse_x509_certificate(receiver_cert.as_ref()) else {
        return false;
    };
    let pk = UnparsedPublicKey::new(
        &ECDSA_P256_SHA256_ASN1,
        x.public_key().subject_public_key.data.as_ref(),
    );
    pk.verify(&signed_bytes(r), &r.signature).is_ok()
}
