//! env: the id and the secret in two Secret keys, for `envFrom` or `env.valueFrom`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use secrecy::{ExposeSecret as _, SecretString};

use super::{Format, value};
use crate::api::SecretTarget;
use crate::plan::snapshot::SecretState;
use crate::secrets::{AccessKey, RenderContext};

pub const DEFAULT_ID_KEY: &str = "AWS_ACCESS_KEY_ID";
pub const DEFAULT_SECRET_KEY: &str = "AWS_SECRET_ACCESS_KEY";

pub struct Env;

fn id_key(t: &SecretTarget) -> &str {
    t.access_key_id_key.as_deref().unwrap_or(DEFAULT_ID_KEY)
}

fn secret_key(t: &SecretTarget) -> &str {
    t.secret_access_key_key.as_deref().unwrap_or(DEFAULT_SECRET_KEY)
}

impl Format for Env {
    fn render(
        &self,
        t: &SecretTarget,
        key: &AccessKey,
        _: &RenderContext,
        _: Option<&Secret>,
    ) -> BTreeMap<String, SecretString> {
        BTreeMap::from([
            (id_key(t).to_owned(), SecretString::from(key.id.clone())),
            (secret_key(t).to_owned(), SecretString::from(key.secret.expose_secret().to_owned())),
        ])
    }

    fn owned_keys(&self, t: &SecretTarget) -> Vec<String> {
        vec![id_key(t).to_owned(), secret_key(t).to_owned()]
    }

    fn held(&self, t: &SecretTarget, s: &Secret) -> SecretState {
        match (value(s, id_key(t)), value(s, secret_key(t))) {
            (None, None) => SecretState::Empty,
            (Some(id), Some(sec)) if !id.trim().is_empty() && !sec.trim().is_empty() => {
                SecretState::Holds(id.trim().to_owned())
            }
            (Some(id), Some(_)) if id.trim().is_empty() => SecretState::Empty,
            _ => SecretState::Unreadable(format!("holds only one of {} and {}", id_key(t), secret_key(t))),
        }
    }

    fn read_key(&self, t: &SecretTarget, s: &Secret) -> Option<AccessKey> {
        Some(AccessKey {
            id: value(s, id_key(t))?.trim().to_owned(),
            secret: SecretString::from(value(s, secret_key(t))?.trim().to_owned()),
        })
    }

    fn readable(&self) -> bool {
        true
    }

    fn validate(&self, i: usize, t: &SecretTarget) -> Result<(), String> {
        // Both values would land in one key, and the secret would overwrite the id.
        let id = id_key(t);
        if id == secret_key(t) {
            return Err(format!("spec.secrets[{i}]: accessKeyIdKey and secretAccessKeyKey are both {id:?}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{key, secret_of, target};
    use super::*;
    use crate::api::SecretFormat;

    #[test]
    fn renders_and_reads_back_the_same_key() {
        let t = target(SecretFormat::Env);
        let s = secret_of(Env.render(&t, &key(), &RenderContext::default(), None));
        assert_eq!(Env.held(&t, &s), SecretState::Holds("AKIAEXAMPLE".into()));
        assert_eq!(Env.read_key(&t, &s).unwrap().secret.expose_secret(), "s3cr3t/+=");
    }

    #[test]
    fn renamed_keys_are_the_ones_written_and_owned() {
        let mut t = target(SecretFormat::Env);
        t.access_key_id_key = Some("ID".into());
        t.secret_access_key_key = Some("SECRET".into());
        let rendered = Env.render(&t, &key(), &RenderContext::default(), None);
        assert_eq!(rendered.keys().collect::<Vec<_>>(), ["ID", "SECRET"]);
        assert_eq!(Env.owned_keys(&t), ["ID", "SECRET"]);
    }

    #[test]
    fn empty_and_half_written_secrets_are_told_apart() {
        let t = target(SecretFormat::Env);
        assert_eq!(Env.held(&t, &Secret::default()), SecretState::Empty);
        let half = secret_of(BTreeMap::from([("AWS_ACCESS_KEY_ID".to_owned(), SecretString::from("AKIA".to_owned()))]));
        assert!(matches!(Env.held(&t, &half), SecretState::Unreadable(_)));
    }

    #[test]
    fn one_key_for_both_values_is_refused() {
        let mut t = target(SecretFormat::Env);
        t.secret_access_key_key = Some(DEFAULT_ID_KEY.into());
        let err = Env.validate(2, &t).unwrap_err();
        assert_eq!(err, "spec.secrets[2]: accessKeyIdKey and secretAccessKeyKey are both \"AWS_ACCESS_KEY_ID\"");
        assert_eq!(Env.validate(2, &target(SecretFormat::Env)), Ok(()));
    }
}
