//! The layouts a key can take in a target Secret, one module each. Everything that depends on
//! the layout (rendering, reading back, validating its fields) lives in that module, so adding a
//! format is one new file plus its line in [`of`]. PURE: no cluster.

use std::any::Any;
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use secrecy::SecretString;

use crate::api::{SecretFormat, SecretTarget};
use crate::plan::snapshot::SecretState;
use crate::secrets::{AccessKey, RenderContext, managers};

pub mod credentials_file;
pub mod env;
pub mod ses_smtp;
pub mod template;

/// One Secret layout. `Any` lets a test tell the registered implementations apart; `Sync` lets
/// them be shared statics.
pub trait Format: Any + Sync {
    /// The Secret keys this format owns in a target, with their content for `key`. `existing` is
    /// the Secret as read just before the write: a shared format merges into it.
    fn render(
        &self,
        t: &SecretTarget,
        key: &AccessKey,
        ctx: &RenderContext,
        existing: Option<&Secret>,
    ) -> BTreeMap<String, SecretString>;
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
    /// Whether several resources may each own a part of one Secret key (render merges into what
    /// is there). A read-modify-write races, so such a write carries the read's resourceVersion.
    /// The defaults below are those of a format whose keys belong to one resource alone.
    fn shared(&self) -> bool {
        false
    }
    /// Annotations written with the key that claim the target's part of a shared key for
    /// `resource`: field ownership cannot tell two owners of one key apart. None for a format
    /// whose keys one resource owns: field ownership of the keys is the claim.
    fn claims(&self, _t: &SecretTarget, _resource: &str) -> BTreeMap<String, String> {
        BTreeMap::new()
    }
    /// Another rekey resource's claim on what this target writes, in the user's terms.
    /// `live` says whether a resource of this namespace exists: a field manager or claim left by a
    /// deleted one is no conflict.
    fn conflict(&self, t: &SecretTarget, s: &Secret, own_manager: &str, live: &dyn Fn(&str) -> bool) -> Option<String> {
        keys_claimed(t, &self.owned_keys(t), s, own_manager, live)
    }
    /// The owned keys' content once the part `resource` wrote is taken out (deletionPolicy
    /// Delete): a key left out is removed. Only a shared format keeps anything.
    fn without(&self, _t: &SecretTarget, _s: &Secret, _resource: &str) -> BTreeMap<String, SecretString> {
        BTreeMap::new()
    }
}

/// The only place a variant meets its implementation: being a `match`, a new variant without one
/// does not compile.
pub fn of(format: SecretFormat) -> &'static dyn Format {
    match format {
        SecretFormat::Env => &env::Env,
        SecretFormat::CredentialsFile => &credentials_file::CredentialsFile,
        SecretFormat::Template => &template::Template,
        SecretFormat::SesSmtp => &ses_smtp::SesSmtp,
    }
}

/// A Secret's value for `key` as text; None when absent or not UTF-8 (neither can hold a key).
fn value(s: &Secret, key: &str) -> Option<String> {
    s.data.as_ref().and_then(|d| d.get(key)).and_then(|v| String::from_utf8(v.0.clone()).ok())
}

/// The conflict of a format whose keys belong to one resource alone: another rekey resource
/// (a field manager `rekey/…` other than `own_manager`) owns one of them.
fn keys_claimed(
    t: &SecretTarget,
    keys: &[String],
    s: &Secret,
    own_manager: &str,
    live: &dyn Fn(&str) -> bool,
) -> Option<String> {
    // A hashed (long) manager name cannot be traced back to its resource: it counts as live.
    let (manager, theirs) = managers::key_owners(keys, s, own_manager)
        .into_iter()
        .find(|(m, _)| m.strip_prefix(managers::REKEY_PREFIX).is_some_and(|r| r.contains('~') || live(r)))?;
    let other = manager.trim_start_matches(managers::REKEY_PREFIX);
    let keys = theirs.into_iter().collect::<Vec<_>>().join(", ");
    Some(format!(
        "Secret {}: key(s) {keys} are also written by IamKeyRotation {other} (field manager {manager}); two resources \
         must not write the same keys: give one of them another Secret or other key names",
        t.name
    ))
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
            region: None,
            username_key: None,
            password_key: None,
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
            let s = secret_of(of(format).render(&t, &key(), &ctx, None));
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
            let s = secret_of(of(format).render(&t, &key(), &ctx, None));
            assert!(of(format).read_key(&t, &s).is_none(), "{format:?}");
        }
    }

    #[test]
    fn every_readable_format_renders_over_its_own_output_and_reads_the_new_key() {
        let ctx = RenderContext::default();
        let newer = AccessKey { id: "AKIANEWER".into(), secret: SecretString::from("n3w".to_owned()) };
        for format in all_formats().into_iter().filter(|f| of(*f).readable()) {
            let t = target(format);
            let old = secret_of(of(format).render(&t, &key(), &ctx, None));
            let s = secret_of(of(format).render(&t, &newer, &ctx, Some(&old)));
            assert_eq!(of(format).held(&t, &s), SecretState::Holds("AKIANEWER".into()), "{format:?}");
            assert_eq!(of(format).read_key(&t, &s).unwrap().secret.expose_secret(), "n3w", "{format:?}");
        }
    }

    fn managed(entries: serde_json::Value) -> Secret {
        serde_json::from_value(serde_json::json!({"metadata": {"managedFields": entries}})).unwrap()
    }

    fn owns(manager: &str, keys: &[&str]) -> serde_json::Value {
        let fields: serde_json::Map<String, serde_json::Value> =
            keys.iter().map(|k| (format!("f:{k}"), serde_json::json!({}))).collect();
        serde_json::json!({"manager": manager, "operation": "Apply", "fieldsType": "FieldsV1",
            "fieldsV1": {"f:data": fields}})
    }

    #[test]
    fn a_key_conflict_is_another_rekey_resource_owning_one_of_the_targets_keys() {
        let env = target(SecretFormat::Env);
        let s = managed(serde_json::json!([
            owns("rekey/mine", &[env::DEFAULT_ID_KEY, env::DEFAULT_SECRET_KEY]),
            owns("rekey/other", &[env::DEFAULT_SECRET_KEY, "UNRELATED"]),
        ]));
        assert_eq!(
            of(SecretFormat::Env).conflict(&env, &s, "rekey/mine", &|_| true).as_deref(),
            Some(
                "Secret s: key(s) AWS_SECRET_ACCESS_KEY are also written by IamKeyRotation other (field manager \
                 rekey/other); two resources must not write the same keys: give one of them another Secret or \
                 other key names"
            )
        );
        // The field manager of a resource that no longer exists (deleted, or renamed in Git) is none.
        assert_eq!(of(SecretFormat::Env).conflict(&env, &s, "rekey/mine", &|r| r != "other"), None);
        let renamed = SecretTarget { secret_access_key_key: Some("OWN".into()), ..env.clone() };
        assert_eq!(of(SecretFormat::Env).conflict(&renamed, &s, "rekey/mine", &|_| true), None, "disjoint keys");
        // Writers that are not rekey (a person, Helm) are a revert, not a claim: not this check's.
        let human = managed(serde_json::json!([owns("kubectl-edit", &[env::DEFAULT_ID_KEY])]));
        assert_eq!(of(SecretFormat::Env).conflict(&env, &human, "rekey/mine", &|_| true), None);

        let mut tmpl = target(SecretFormat::Template);
        tmpl.template = Some(BTreeMap::from([("config.json".to_owned(), "{{ .SecretAccessKey }}".to_owned())]));
        let s = managed(serde_json::json!([owns("rekey/other", &["config.json"])]));
        let why = of(SecretFormat::Template).conflict(&tmpl, &s, "rekey/mine", &|_| true).unwrap();
        assert!(why.starts_with("Secret s: key(s) config.json are also written by IamKeyRotation other"), "{why}");
        assert_eq!(of(SecretFormat::Template).conflict(&tmpl, &s, "rekey/other", &|_| true), None, "its own keys");
    }

    #[test]
    fn only_a_shared_format_claims_by_annotation_or_keeps_anything_on_removal() {
        for format in all_formats() {
            let f = of(format);
            let t = target(format);
            if !f.shared() {
                assert!(f.claims(&t, "r").is_empty(), "{format:?}");
                let s = secret_of(f.render(&t, &key(), &RenderContext::default(), None));
                assert!(f.without(&t, &s, "r").is_empty(), "{format:?}");
            } else {
                assert!(!f.claims(&t, "r").is_empty(), "{format:?}");
            }
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
