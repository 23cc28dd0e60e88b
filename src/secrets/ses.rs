//! The Amazon SES SMTP password of an access key, by AWS's published derivation ("Obtaining Amazon
//! SES SMTP credentials"): a SigV4 signing key for a fixed date, the region and `ses`, then a
//! signature of `SendRawEmail`, behind a version byte. The SMTP user name is the access key id, so
//! every rotated key gives a mail relay working SMTP credentials without a human converting it.
//! PURE.

use aws_lc_rs::hmac;
use secrecy::{ExposeSecret as _, SecretSlice, SecretString};

// Fixed by AWS: the password depends on the key and the region only, never on today's date.
const DATE: &str = "11111111";
const SERVICE: &str = "ses";
const TERMINAL: &str = "aws4_request";
const MESSAGE: &str = "SendRawEmail";
const VERSION: u8 = 0x04;

/// The SES SMTP password for `secret` (an IAM secret access key) in SES region `region`.
pub fn smtp_password(secret: &SecretString, region: &str) -> SecretString {
    let seed = SecretSlice::from(format!("AWS4{}", secret.expose_secret()).into_bytes());
    let mut signature = sign(&seed, DATE);
    for part in [region, SERVICE, TERMINAL, MESSAGE] {
        signature = sign(&signature, part);
    }
    let versioned = SecretSlice::from([&[VERSION], signature.expose_secret()].concat());
    SecretString::from(super::base64(versioned.expose_secret()))
}

/// One link of the chain; every intermediate key is secret material and is wiped when dropped.
fn sign(key: &SecretSlice<u8>, msg: &str) -> SecretSlice<u8> {
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key.expose_secret()), msg.as_bytes());
    SecretSlice::from(tag.as_ref().to_vec())
}

/// Whether `region` has the shape of an AWS region name (`eu-west-1`, `us-gov-west-1`), the CRD
/// schema's `^[a-z]{2}(-[a-z]+)+-[0-9]+$`. Which regions offer SES changes over time: not checked.
pub fn valid_region(region: &str) -> bool {
    let parts: Vec<&str> = region.split('-').collect();
    let lower = |p: &str| !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase());
    match parts.as_slice() {
        [area, words @ .., number] if !words.is_empty() => {
            area.len() == 2
                && lower(area)
                && words.iter().all(|w| lower(w))
                && !number.is_empty()
                && number.chars().all(|c| c.is_ascii_digit())
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    /// Published input/output pairs for this derivation: terraform-provider-aws's own tests of its
    /// `ses_smtp_password_v4` (TestSESSMTPPasswordFromSecretKeySigV4), whose passwords authenticate
    /// against SES.
    const PUBLISHED: [(&str, &str, &str); 4] = [
        ("eu-central-1", "some+secret+key", "BMXhUYlu5Z3gSXVQORxlVa7XPaz91aGWdfHxvkOZdWZ2"),
        ("eu-central-1", "another+secret+key", "BBbphbrQmrKMx42d1N6+C7VINYEBGI5v9VsZeTxwskfh"),
        ("us-west-1", "some+secret+key", "BH+jbMzper5WwlwUar9E1ySBqHa9whi0GPo+sJ0mVYJj"),
        ("us-west-1", "another+secret+key", "BKVmjjMDFk/qqw8EROW99bjCS65PF8WKvK5bSr4Y6EqF"),
    ];

    fn password(secret: &str, region: &str) -> String {
        smtp_password(&SecretString::from(secret.to_owned()), region).expose_secret().to_owned()
    }

    #[test]
    fn the_published_examples_come_out() {
        for (region, secret, want) in PUBLISHED {
            assert_eq!(password(secret, region), want, "{secret} in {region}");
        }
    }

    /// AWS's published derivation in Python (not rekey's code): tests/support/ses_calculate_key.py.
    const CALCULATE_KEY: &str = include_str!("../../tests/support/ses_calculate_key.py");

    fn python_password(secret: &str, region: &str) -> String {
        use std::io::Write as _;
        let mut child = Command::new("python3")
            .args(["-c", CALCULATE_KEY])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs");
        // On stdin, not argv: a secret does not belong in a process list, even a test's.
        child.stdin.take().unwrap().write_all(format!("{secret}\n{region}\n").as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    #[test]
    fn agrees_with_an_independent_implementation_for_key_shaped_secrets_and_regions() {
        let cases = [
            ("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "us-east-1"),
            ("s3cr3t/+=", "eu-west-1"),
            ("Zm9vYmFyYmF6cXV4cXV1eGNvcmdlZ3JhdWx0Z2Fy", "us-gov-west-1"),
            ("", "ap-southeast-2"),
        ];
        for (secret, region) in cases {
            assert_eq!(password(secret, region), python_password(secret, region), "{secret:?} in {region}");
        }
        for (region, secret, want) in PUBLISHED {
            assert_eq!(python_password(secret, region), want, "the independent implementation is AWS's");
        }
    }

    #[test]
    fn the_password_depends_on_the_region() {
        assert_ne!(password("k", "eu-west-1"), password("k", "eu-west-2"));
    }

    #[test]
    fn region_names_are_told_from_other_text() {
        for ok in ["eu-west-1", "us-east-2", "us-gov-west-1", "ap-southeast-2", "il-central-1", "eu-central-10"] {
            assert!(valid_region(ok), "{ok}");
        }
        for bad in ["", "eu", "eu-west", "eu-1", "EU-WEST-1", "eu-west-1a", "europe-west-1", "eu--1", "eu-west-1-"] {
            assert!(!valid_region(bad), "{bad}");
        }
    }
}
