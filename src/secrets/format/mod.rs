//! The layouts a key can take in a target Secret, one module each. Everything that depends on
//! the layout (rendering, reading back, validating its fields) lives in that module, so adding a
//! format is one new file plus its line in [`of`]. PURE: no cluster.

use std::any::Any;
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use secrecy::SecretString;

use crate::api::{SecretFormat, SecretTarget};
use crate::plan::snapshot::SecretState;
use crate::secrets::{AccessKey, RenderContext};

pub mod credentials_file;
pub mod env;
pub mod template;

/// One Secret layout. `Any` lets a test tell the registered implementations apart; `Sync` lets
/// them be shared statics.
pub trait Format: Any + Sync {
    /// The Secret keys this format owns in a target, with their content for `key`.
    fn render(&self, t: &SecretTarget, key: &AccessKey, ctx: &RenderContext) -> BTreeMap<String, SecretString>;
    /// The Secret keys this format owns (for removal and for "is it empty").
    fn owned_keys(&self, t: &SecretTarget) -> Vec<String>;
    /// Which key the Secret holds, read from the owned keys.
    fn held(&self, t: &SecretTarget, s: &Secret) -> SecretState;
    /// The whole key (id and secret), when the format can be read back; None otherwise.
    fn read_key(&self, t: &SecretTarget, s: &Secret) -> Option<AccessKey>;
    /// Whether a key can be copied back out of a Secret of this format (to fill a Secret added
    /// later without a new key).
    fn readable(&self) -> bool;
    /// Checks of the target's per-format fields, in the user's terms ("spec.secrets[i]…").
    fn validate(&self, i: usize, t: &SecretTarget) -> Result<(), String>;
}

/// The only place a variant meets its implementation: being a `match`, a new variant without one
/// does not compile.
pub fn of(format: SecretFormat) -> &'static dyn Format {
    match format {
        SecretFormat::Env => &env::Env,
        SecretFormat::CredentialsFile => &credentials_file::CredentialsFile,
        SecretFormat::Template => &template::Template,
    }
}

/// A Secret's value for `key` as text; None when absent or not UTF-8 (neither can hold a key).
fn value(s: &Secret, key: &str) -> Option<String> {
    s.data.as_ref().and_then(|d| d.get(key)).and_then(|v| String::from_utf8(v.0.clone()).ok())
}

/// Kubernetes' Secret data key rule: `[-._a-zA-Z0-9]+`, at most 253 characters.
pub fn valid_secret_key(key: &str) -> bool {
    (1..=253).contains(&key.len()) && key.chars().all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use k8s_openapi::ByteString;
    use secrecy::ExposeSecret as _;

    use super::*;

    pub(super) fn target(format: SecretFormat) -> SecretTarget {
        SecretTarget {
            name: "s".into(),
            format,
            access_key_id_key: None,
            secret_access_key_key: None,
            profile: None,
            template: None,
        }
    }

    pub(super) fn key() -> AccessKey {
        AccessKey { id: "AKIAEXAMPLE".into(), secret: SecretString::from("s3cr3t/+=".to_owned()) }
    }

    pub(super) fn secret_of(data: BTreeMap<String, SecretString>) -> Secret {
        Secret {
            data: Some(data.into_iter().map(|(k, v)| (k, ByteString(v.expose_secret().as_bytes().to_vec()))).collect()),
            ..Default::default()
        }
    }

    /// Every variant, from the CRD schema rather than a hand-kept list, so a new variant cannot be
    /// left out of these tests. (Variants with doc comments come as `oneOf` of `const`s.)
    fn all_formats() -> Vec<SecretFormat> {
        let schema = serde_json::to_value(schemars::schema_for!(SecretFormat)).unwrap();
        let names: Vec<serde_json::Value> = match (schema["enum"].as_array(), schema["oneOf"].as_array()) {
            (Some(names), _) => names.clone(),
            (None, Some(alts)) => alts.iter().map(|a| a["const"].clone()).collect(),
            (None, None) => panic!("no variants in {schema}"),
        };
        names.into_iter().map(|n| serde_json::from_value(n).unwrap()).collect()
    }

    #[test]
    fn every_format_is_registered_with_its_own_implementation() {
        let formats = all_formats();
        assert!(formats.contains(&SecretFormat::Env) && formats.contains(&SecretFormat::Template), "{formats:?}");
        let impls: BTreeSet<_> = formats.iter().map(|f| (of(*f) as &dyn Any).type_id()).collect();
        assert_eq!(impls.len(), formats.len(), "two formats share an implementation");
    }

    #[test]
    fn every_readable_format_reads_back_the_key_it_rendered() {
        let ctx = RenderContext { user_name: "u".into(), region: "eu-west-1".into() };
        let readable: Vec<SecretFormat> = all_formats().into_iter().filter(|f| of(*f).readable()).collect();
        assert!(!readable.is_empty());
        for format in readable {
            let t = target(format);
            let s = secret_of(of(format).render(&t, &key(), &ctx));
            assert_eq!(of(format).held(&t, &s), SecretState::Holds("AKIAEXAMPLE".into()), "{format:?}");
            let back = of(format).read_key(&t, &s).unwrap_or_else(|| panic!("{format:?} read back nothing"));
            assert_eq!(back.id, "AKIAEXAMPLE", "{format:?}");
            assert_eq!(back.secret.expose_secret(), "s3cr3t/+=", "{format:?}");
        }
    }

    #[test]
    fn a_format_that_is_not_readable_never_reads_a_key_back() {
        let ctx = RenderContext::default();
        for format in all_formats().into_iter().filter(|f| !of(*f).readable()) {
            let mut t = target(format);
            t.template =
                Some(BTreeMap::from([("k".to_owned(), "{{ .AccessKeyId }} {{ .SecretAccessKey }}".to_owned())]));
            let s = secret_of(of(format).render(&t, &key(), &ctx));
            assert!(of(format).read_key(&t, &s).is_none(), "{format:?}");
        }
    }

    #[test]
    fn secret_keys_follow_the_kubernetes_rule() {
        assert!(valid_secret_key("config.json"));
        assert!(!valid_secret_key("a/b"));
        assert!(!valid_secret_key(""));
        assert!(!valid_secret_key(&"k".repeat(254)));
    }
}
