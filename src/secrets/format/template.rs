//! template: Secret keys rendered from the target's `template` map by plain placeholder
//! substitution, for config files in whatever shape the workload reads.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use secrecy::{ExposeSecret as _, SecretString};

use super::{Format, ses_smtp, valid_secret_key, value};
use crate::api::{ACCESS_KEY_ANNOTATION, SecretTarget};
use crate::plan::snapshot::SecretState;
use crate::secrets::{AccessKey, RenderContext};

pub const SECRET_PLACEHOLDER: &str = "{{ .SecretAccessKey }}";
/// The SES SMTP password for the target's `region`, for a mail relay's own config file.
pub const SES_PASSWORD_PLACEHOLDER: &str = "{{ .SesSmtpPassword }}";

pub struct Template;

impl Format for Template {
    fn render(
        &self,
        t: &SecretTarget,
        key: &AccessKey,
        ctx: &RenderContext,
        _: Option<&Secret>,
    ) -> BTreeMap<String, SecretString> {
        let secret = key.secret.expose_secret();
        let ses_password = ses_smtp::password(t, key, ctx);
        let fill = |tmpl: &str| {
            tmpl.replace("{{ .AccessKeyId }}", &key.id)
                .replace(SECRET_PLACEHOLDER, secret)
                .replace(SES_PASSWORD_PLACEHOLDER, ses_password.expose_secret())
                .replace("{{ .UserName }}", &ctx.user_name)
                .replace("{{ .Region }}", &ctx.region)
        };
        t.template.iter().flatten().map(|(k, tmpl)| (k.clone(), SecretString::from(fill(tmpl)))).collect()
    }

    fn owned_keys(&self, t: &SecretTarget) -> Vec<String> {
        t.template.iter().flatten().map(|(k, _)| k.clone()).collect()
    }

    /// The rendered text cannot be parsed back, so the key id is the one rekey stamped on the
    /// Secret when it wrote it.
    fn held(&self, t: &SecretTarget, s: &Secret) -> SecretState {
        let present = self.owned_keys(t).iter().any(|k| value(s, k).is_some());
        let stamped = s.metadata.annotations.as_ref().and_then(|a| a.get(ACCESS_KEY_ANNOTATION)).cloned();
        match (present, stamped) {
            (false, _) => SecretState::Empty,
            (true, Some(id)) => SecretState::Holds(id),
            (true, None) => SecretState::Unreadable(format!(
                "holds template keys rekey did not write (no {ACCESS_KEY_ANNOTATION} annotation)"
            )),
        }
    }

    fn read_key(&self, _: &SecretTarget, _: &Secret) -> Option<AccessKey> {
        // A template's text cannot be parsed back reliably.
        None
    }

    fn readable(&self) -> bool {
        false
    }

    fn validate(&self, i: usize, target: &SecretTarget) -> Result<(), String> {
        let Some(t) = target.template.as_ref().filter(|t| !t.is_empty()) else {
            return Err(format!("spec.secrets[{i}]: format template needs a non-empty template map"));
        };
        let uses = |placeholder: &str| t.values().any(|text| text.contains(placeholder));
        if !uses(SECRET_PLACEHOLDER) && !uses(SES_PASSWORD_PLACEHOLDER) {
            return Err(format!(
                "spec.secrets[{i}]: the template uses neither {SECRET_PLACEHOLDER} nor {SES_PASSWORD_PLACEHOLDER} so \
                 no key would be delivered"
            ));
        }
        if uses(SES_PASSWORD_PLACEHOLDER) {
            ses_smtp::check_region(i, target, &format!("a template using {SES_PASSWORD_PLACEHOLDER}"))?;
        }
        // The CRD schema cannot constrain a map's keys: unchecked, a bad one would be refused by the
        // apiserver only when rekey writes the Secret.
        if let Some(key) = t.keys().find(|k| !valid_secret_key(k)) {
            return Err(format!("spec.secrets[{i}].template: {key:?} is not a valid Secret key"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{key, secret_of, target};
    use super::*;
    use crate::api::SecretFormat;

    fn templated(entries: &[(&str, &str)]) -> SecretTarget {
        let mut t = target(SecretFormat::Template);
        t.template = Some(entries.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect());
        t
    }

    #[test]
    fn every_placeholder_is_filled() {
        let ctx = RenderContext { user_name: "u".into(), region: "eu-west-1".into() };
        let t = templated(&[(
            "config.json",
            r#"{"id":"{{ .AccessKeyId }}","secret":"{{ .SecretAccessKey }}","user":"{{ .UserName }}","region":"{{ .Region }}"}"#,
        )]);
        let rendered = Template.render(&t, &key(), &ctx, None);
        assert_eq!(
            rendered["config.json"].expose_secret(),
            r#"{"id":"AKIAEXAMPLE","secret":"s3cr3t/+=","user":"u","region":"eu-west-1"}"#
        );
    }

    #[test]
    fn the_key_held_is_the_one_stamped_and_content_rekey_did_not_write_is_unreadable() {
        let t = templated(&[("k", "{{ .SecretAccessKey }}")]);
        assert_eq!(Template.held(&t, &Secret::default()), SecretState::Empty);
        let mut s = secret_of(BTreeMap::from([("k".to_owned(), SecretString::from("x".to_owned()))]));
        assert!(matches!(Template.held(&t, &s), SecretState::Unreadable(_)));
        s.metadata.annotations = Some(BTreeMap::from([(ACCESS_KEY_ANNOTATION.to_owned(), "AKIAEXAMPLE".to_owned())]));
        assert_eq!(Template.held(&t, &s), SecretState::Holds("AKIAEXAMPLE".into()));
        assert!(Template.read_key(&t, &s).is_none());
    }

    #[test]
    fn each_rule_names_the_field_to_fix() {
        let cases = [
            (target(SecretFormat::Template), "spec.secrets[1]: format template needs a non-empty template map"),
            (templated(&[]), "spec.secrets[1]: format template needs a non-empty template map"),
            (
                templated(&[("k", "{{ .AccessKeyId }}")]),
                "spec.secrets[1]: the template uses neither {{ .SecretAccessKey }} nor {{ .SesSmtpPassword }} so no \
                 key would be delivered",
            ),
            (
                templated(&[("k", "{{ .SesSmtpPassword }}")]),
                "spec.secrets[1]: a template using {{ .SesSmtpPassword }} needs region, the SES region the SMTP \
                 password is for (e.g. eu-west-1)",
            ),
            (
                SecretTarget { region: Some("west".into()), ..templated(&[("k", "{{ .SesSmtpPassword }}")]) },
                "spec.secrets[1].region: \"west\" is not an AWS region name (like eu-west-1)",
            ),
            (
                templated(&[("a/b", "{{ .SecretAccessKey }}")]),
                "spec.secrets[1].template: \"a/b\" is not a valid Secret key",
            ),
        ];
        for (t, want) in cases {
            assert_eq!(Template.validate(1, &t), Err(want.to_owned()));
        }
        assert_eq!(Template.validate(1, &templated(&[("k", "{{ .SecretAccessKey }}")])), Ok(()));
        let relay = SecretTarget { region: Some("eu-west-1".into()), ..templated(&[("k", "{{ .SesSmtpPassword }}")]) };
        assert_eq!(Template.validate(1, &relay), Ok(()), "the SMTP password alone delivers the key");
    }

    #[test]
    fn the_ses_smtp_password_is_the_one_for_the_entrys_region_not_the_resources() {
        let mut t = templated(&[(
            "sasl_passwd",
            "[email-smtp.eu-central-1.amazonaws.com]:587 {{ .AccessKeyId }}:{{ .SesSmtpPassword }}",
        )]);
        t.region = Some("eu-central-1".into());
        let k = AccessKey { id: "AKIAEXAMPLE".into(), secret: SecretString::from("some+secret+key".to_owned()) };
        let ctx = RenderContext { user_name: "u".into(), region: "us-east-1".into() };
        let rendered = Template.render(&t, &k, &ctx, None);
        // terraform-provider-aws's published vector for this secret and region (see secrets::ses).
        assert_eq!(
            rendered["sasl_passwd"].expose_secret(),
            "[email-smtp.eu-central-1.amazonaws.com]:587 AKIAEXAMPLE:BMXhUYlu5Z3gSXVQORxlVa7XPaz91aGWdfHxvkOZdWZ2"
        );
    }
}
