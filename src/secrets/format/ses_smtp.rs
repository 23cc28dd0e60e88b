//! sesSmtp: Amazon SES SMTP credentials for a mail relay, the user name (the access key id) and the
//! password derived from the secret for the target's `region`, in two Secret keys.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use secrecy::SecretString;

use super::{Format, valid_secret_key, value};
use crate::api::SecretTarget;
use crate::plan::snapshot::SecretState;
use crate::secrets::{AccessKey, RenderContext, ses};

pub const DEFAULT_USERNAME_KEY: &str = "SMTP_USERNAME";
pub const DEFAULT_PASSWORD_KEY: &str = "SMTP_PASSWORD";

pub struct SesSmtp;

fn username_key(t: &SecretTarget) -> &str {
    t.username_key.as_deref().unwrap_or(DEFAULT_USERNAME_KEY)
}

fn password_key(t: &SecretTarget) -> &str {
    t.password_key.as_deref().unwrap_or(DEFAULT_PASSWORD_KEY)
}

/// The SMTP password of `key` for the target's region. `validate` requires the region; the
/// resource's own region only keeps this total for a caller that did not validate.
pub fn password(t: &SecretTarget, key: &AccessKey, ctx: &RenderContext) -> SecretString {
    ses::smtp_password(&key.secret, t.region.as_deref().unwrap_or(&ctx.region))
}

/// The target's `region`, present and shaped like a region name; `needs` says what requires it.
pub fn check_region(i: usize, t: &SecretTarget, needs: &str) -> Result<(), String> {
    match t.region.as_deref() {
        None => Err(format!(
            "spec.secrets[{i}]: {needs} needs region, the SES region the SMTP password is for (e.g. eu-west-1)"
        )),
        Some(r) if !ses::valid_region(r) => {
            Err(format!("spec.secrets[{i}].region: {r:?} is not an AWS region name (like eu-west-1)"))
        }
        Some(_) => Ok(()),
    }
}

impl Format for SesSmtp {
    fn render(
        &self,
        t: &SecretTarget,
        key: &AccessKey,
        ctx: &RenderContext,
        _: Option<&Secret>,
    ) -> BTreeMap<String, SecretString> {
        BTreeMap::from([
            (username_key(t).to_owned(), SecretString::from(key.id.clone())),
            (password_key(t).to_owned(), password(t, key, ctx)),
        ])
    }

    fn owned_keys(&self, t: &SecretTarget) -> Vec<String> {
        vec![username_key(t).to_owned(), password_key(t).to_owned()]
    }

    /// The SMTP user name is the access key id, so the key held reads straight off the Secret.
    fn held(&self, t: &SecretTarget, s: &Secret) -> SecretState {
        match (value(s, username_key(t)), value(s, password_key(t))) {
            (None, None) => SecretState::Empty,
            (Some(id), Some(pw)) if !id.trim().is_empty() && !pw.trim().is_empty() => {
                SecretState::Holds(id.trim().to_owned())
            }
            (Some(id), Some(_)) if id.trim().is_empty() => SecretState::Empty,
            _ => SecretState::Unreadable(format!("holds only one of {} and {}", username_key(t), password_key(t))),
        }
    }

    fn read_key(&self, _: &SecretTarget, _: &Secret) -> Option<AccessKey> {
        // The password is a one-way derivation of the secret access key: no key to copy out.
        None
    }

    fn readable(&self) -> bool {
        false
    }

    fn validate(&self, i: usize, t: &SecretTarget) -> Result<(), String> {
        check_region(i, t, "format sesSmtp")?;
        // The CRD schema has the same pattern; checked here too for `rekey check` on files.
        for (field, key) in [("usernameKey", &t.username_key), ("passwordKey", &t.password_key)] {
            if let Some(k) = key.as_deref().filter(|k| !valid_secret_key(k)) {
                return Err(format!("spec.secrets[{i}].{field}: {k:?} is not a valid Secret key"));
            }
        }
        // Both values would land in one key, and the password would overwrite the user name.
        let user = username_key(t);
        if user == password_key(t) {
            return Err(format!("spec.secrets[{i}]: usernameKey and passwordKey are both {user:?}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret as _;

    use super::super::tests::{key, secret_of, target};
    use super::*;
    use crate::api::SecretFormat;

    fn smtp(region: &str) -> SecretTarget {
        SecretTarget { region: Some(region.into()), ..target(SecretFormat::SesSmtp) }
    }

    #[test]
    fn renders_the_key_id_as_user_name_and_the_derived_password() {
        let t = smtp("eu-central-1");
        let k = AccessKey { id: "AKIAEXAMPLE".into(), secret: SecretString::from("some+secret+key".to_owned()) };
        let rendered = SesSmtp.render(&t, &k, &RenderContext::default(), None);
        assert_eq!(rendered.keys().collect::<Vec<_>>(), ["SMTP_PASSWORD", "SMTP_USERNAME"]);
        assert_eq!(rendered["SMTP_USERNAME"].expose_secret(), "AKIAEXAMPLE");
        // terraform-provider-aws's published vector for this secret and region (see secrets::ses).
        assert_eq!(rendered["SMTP_PASSWORD"].expose_secret(), "BMXhUYlu5Z3gSXVQORxlVa7XPaz91aGWdfHxvkOZdWZ2");
    }

    #[test]
    fn the_key_id_is_read_back_but_never_a_key_to_copy() {
        let t = smtp("eu-west-1");
        assert_eq!(SesSmtp.held(&t, &Secret::default()), SecretState::Empty);
        let s = secret_of(SesSmtp.render(&t, &key(), &RenderContext::default(), None));
        assert_eq!(SesSmtp.held(&t, &s), SecretState::Holds("AKIAEXAMPLE".into()));
        assert!(SesSmtp.read_key(&t, &s).is_none());
        assert!(!SesSmtp.readable());
        let half = secret_of(BTreeMap::from([("SMTP_USERNAME".to_owned(), SecretString::from("AKIA".to_owned()))]));
        assert!(matches!(SesSmtp.held(&t, &half), SecretState::Unreadable(_)));
    }

    #[test]
    fn renamed_keys_are_the_ones_written_and_owned() {
        let t =
            SecretTarget { username_key: Some("user".into()), password_key: Some("pass".into()), ..smtp("eu-west-1") };
        let rendered = SesSmtp.render(&t, &key(), &RenderContext::default(), None);
        assert_eq!(rendered.keys().collect::<Vec<_>>(), ["pass", "user"]);
        assert_eq!(SesSmtp.owned_keys(&t), ["user", "pass"]);
        assert_eq!(SesSmtp.held(&t, &secret_of(rendered)), SecretState::Holds("AKIAEXAMPLE".into()));
    }

    #[test]
    fn each_rule_names_the_field_to_fix() {
        let cases = [
            (
                target(SecretFormat::SesSmtp),
                "spec.secrets[3]: format sesSmtp needs region, the SES region the SMTP password is for (e.g. eu-west-1)",
            ),
            (smtp("Ireland"), "spec.secrets[3].region: \"Ireland\" is not an AWS region name (like eu-west-1)"),
            (
                SecretTarget { username_key: Some("a/b".into()), ..smtp("eu-west-1") },
                "spec.secrets[3].usernameKey: \"a/b\" is not a valid Secret key",
            ),
            (
                SecretTarget { password_key: Some(String::new()), ..smtp("eu-west-1") },
                "spec.secrets[3].passwordKey: \"\" is not a valid Secret key",
            ),
            (
                SecretTarget { password_key: Some("SMTP_USERNAME".into()), ..smtp("eu-west-1") },
                "spec.secrets[3]: usernameKey and passwordKey are both \"SMTP_USERNAME\"",
            ),
        ];
        for (t, want) in cases {
            assert_eq!(SesSmtp.validate(3, &t), Err(want.to_owned()));
        }
        assert_eq!(SesSmtp.validate(3, &smtp("us-gov-west-1")), Ok(()));
    }
}
