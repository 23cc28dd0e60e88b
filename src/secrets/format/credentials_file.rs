//! credentialsFile: one Secret key `credentials` holding an AWS shared credentials file (INI) with
//! one profile section, for mounting as `~/.aws/credentials`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use secrecy::{ExposeSecret as _, SecretString};

use super::{Format, value};
use crate::api::SecretTarget;
use crate::plan::snapshot::SecretState;
use crate::secrets::{AccessKey, RenderContext};

pub const CREDENTIALS_KEY: &str = "credentials";

pub struct CredentialsFile;

fn profile(t: &SecretTarget) -> &str {
    t.profile.as_deref().unwrap_or("default")
}

/// An INI credentials file's pair for `profile`. `[profile x]` is accepted too: it is how the
/// AWS config file names sections, so a section copied from there still reads.
fn ini_pair(text: &str, profile: &str) -> (Option<String>, Option<String>) {
    let mut in_section = false;
    let (mut id, mut secret) = (None, None);
    for line in text.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.trim();
            in_section = name == profile || name == format!("profile {profile}");
            continue;
        }
        if !in_section {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            match k.trim() {
                "aws_access_key_id" => id = Some(v.trim().to_owned()),
                "aws_secret_access_key" => secret = Some(v.trim().to_owned()),
                _ => {}
            }
        }
    }
    (id, secret)
}

impl Format for CredentialsFile {
    fn render(&self, t: &SecretTarget, key: &AccessKey, _: &RenderContext) -> BTreeMap<String, SecretString> {
        let text = format!(
            "[{}]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            profile(t),
            key.id,
            key.secret.expose_secret()
        );
        BTreeMap::from([(CREDENTIALS_KEY.to_owned(), SecretString::from(text))])
    }

    fn owned_keys(&self, _: &SecretTarget) -> Vec<String> {
        vec![CREDENTIALS_KEY.to_owned()]
    }

    fn held(&self, t: &SecretTarget, s: &Secret) -> SecretState {
        match value(s, CREDENTIALS_KEY) {
            None => SecretState::Empty,
            Some(text) => match ini_pair(&text, profile(t)) {
                (Some(id), Some(_)) => SecretState::Holds(id),
                (None, None) => SecretState::Empty,
                _ => SecretState::Unreadable(format!("profile {} of key {CREDENTIALS_KEY} is incomplete", profile(t))),
            },
        }
    }

    fn read_key(&self, t: &SecretTarget, s: &Secret) -> Option<AccessKey> {
        match ini_pair(&value(s, CREDENTIALS_KEY)?, profile(t)) {
            (Some(id), Some(secret)) => Some(AccessKey { id, secret: SecretString::from(secret) }),
            _ => None,
        }
    }

    fn readable(&self) -> bool {
        true
    }

    fn validate(&self, _: usize, _: &SecretTarget) -> Result<(), String> {
        // The profile name's only rule is the CRD schema's pattern, which the apiserver enforces.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{key, secret_of, target};
    use super::*;
    use crate::api::SecretFormat;

    fn credentials(text: &str) -> Secret {
        secret_of(BTreeMap::from([(CREDENTIALS_KEY.to_owned(), SecretString::from(text.to_owned()))]))
    }

    #[test]
    fn renders_and_reads_back_the_same_key() {
        let t = target(SecretFormat::CredentialsFile);
        let s = secret_of(CredentialsFile.render(&t, &key(), &RenderContext::default()));
        assert_eq!(CredentialsFile.held(&t, &s), SecretState::Holds("AKIAEXAMPLE".into()));
        assert_eq!(CredentialsFile.read_key(&t, &s).unwrap().secret.expose_secret(), "s3cr3t/+=");
    }

    #[test]
    fn a_profile_is_read_by_name() {
        let mut t = target(SecretFormat::CredentialsFile);
        t.profile = Some("billing".into());
        let s = credentials(
            "[default]\naws_access_key_id = AKIAOTHER\naws_secret_access_key = x\n[billing]\naws_access_key_id = AKIAB\naws_secret_access_key = y\n",
        );
        assert_eq!(CredentialsFile.held(&t, &s), SecretState::Holds("AKIAB".into()));
        assert_eq!(CredentialsFile.read_key(&t, &s).unwrap().secret.expose_secret(), "y");
    }

    #[test]
    fn a_config_file_style_section_is_accepted() {
        let mut t = target(SecretFormat::CredentialsFile);
        t.profile = Some("billing".into());
        let s = credentials("[ profile billing ]\naws_access_key_id=AKIAB\naws_secret_access_key=y\n");
        assert_eq!(CredentialsFile.held(&t, &s), SecretState::Holds("AKIAB".into()));
    }

    #[test]
    fn a_missing_or_incomplete_profile_is_told_apart() {
        let t = target(SecretFormat::CredentialsFile);
        assert_eq!(CredentialsFile.held(&t, &Secret::default()), SecretState::Empty);
        assert_eq!(CredentialsFile.held(&t, &credentials("[other]\naws_access_key_id = A\n")), SecretState::Empty);
        let half = credentials("[default]\naws_access_key_id = AKIA\n");
        assert!(matches!(CredentialsFile.held(&t, &half), SecretState::Unreadable(_)));
        assert!(CredentialsFile.read_key(&t, &half).is_none());
    }
}
