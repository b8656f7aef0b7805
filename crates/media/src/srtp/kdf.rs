//! The SRTP key derivation function (RFC 3711 §4.3) with the AES-CM PRF
//! (§4.3.3), key derivation rate 0 (as SDES and DTLS-SRTP use it).
//! AEAD_AES_128_GCM uses the same PRF with its 96-bit salt zero-padded on the
//! right to 112 bits (RFC 7714 §11, as libsrtp does).

use aes::cipher::{generic_array::GenericArray, BlockEncrypt, KeyInit};
use aes::Aes128Enc;

/// Label of the SRTP encryption key.
pub const LABEL_SRTP_ENCRYPTION: u8 = 0x00;
/// Label of the SRTP authentication key.
pub const LABEL_SRTP_AUTH: u8 = 0x01;
/// Label of the SRTP salt.
pub const LABEL_SRTP_SALT: u8 = 0x02;
/// Label of the SRTCP encryption key.
pub const LABEL_SRTCP_ENCRYPTION: u8 = 0x03;
/// Label of the SRTCP authentication key.
pub const LABEL_SRTCP_AUTH: u8 = 0x04;
/// Label of the SRTCP salt.
pub const LABEL_SRTCP_SALT: u8 = 0x05;

/// The AES-CM PRF keyed with one master key.
pub struct Kdf {
    cipher: Aes128Enc,
    salt: [u8; 14],
}

impl Kdf {
    /// `master_key` is 16 bytes, `master_salt` at most 14 (shorter salts are
    /// padded with zeros on the right).
    ///
    /// # Panics
    /// If the lengths are not as said; callers check them first.
    pub fn new(master_key: &[u8], master_salt: &[u8]) -> Kdf {
        assert_eq!(master_key.len(), 16, "AES-128 master key");
        assert!(master_salt.len() <= 14, "master salt of at most 112 bits");
        let mut salt = [0u8; 14];
        salt[..master_salt.len()].copy_from_slice(master_salt);
        Kdf {
            cipher: Aes128Enc::new(GenericArray::from_slice(master_key)),
            salt,
        }
    }

    /// Fills `out` with the key stream for `label` (r = index DIV kdr = 0).
    pub fn derive(&self, label: u8, out: &mut [u8]) {
        // x = (label || r) XOR master_salt, right-aligned in 112 bits; the
        // input block is x * 2^16 followed by a 16-bit block counter.
        let mut block = [0u8; 16];
        block[..14].copy_from_slice(&self.salt);
        block[7] ^= label;
        for (i, chunk) in out.chunks_mut(16).enumerate() {
            let mut b = block;
            b[14..].copy_from_slice(&(i as u16).to_be_bytes());
            let ga = GenericArray::from_mut_slice(&mut b);
            self.cipher.encrypt_block(ga);
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// RFC 3711 Appendix B.3.
    #[test]
    fn rfc3711_b3_vectors() {
        let kdf = Kdf::new(
            &h("E1F97A0D3E018BE0D64FA32C06DE4139"),
            &h("0EC675AD498AFEEBB6960B3AABE6"),
        );
        let mut key = [0u8; 16];
        kdf.derive(LABEL_SRTP_ENCRYPTION, &mut key);
        assert_eq!(key.to_vec(), h("C61E7A93744F39EE10734AFE3FF7A087"));
        let mut salt = [0u8; 14];
        kdf.derive(LABEL_SRTP_SALT, &mut salt);
        assert_eq!(salt.to_vec(), h("30CBBC08863D8C85D49DB34A9AE1"));
        let mut auth = [0u8; 20];
        kdf.derive(LABEL_SRTP_AUTH, &mut auth);
        assert_eq!(auth.to_vec(), h("CEBE321F6FF7716B6FD4AB49AF256A156D38BAA4"));
    }
}
