//! Validation of a spec: the backstop of the CRD's schema and CEL rules (`cel`), which the apiserver
//! applies at admission, and the rules CEL cannot express (a time zone's existence, a duration that
//! overflows, the staging Secret's name). Pure: no cluster, no IAM. A failure becomes
//! `Stalled/InvalidSpec` with this text; `rekey check` runs it on files.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::api::{IamKeyRotation, IamKeyRotationSpec};
use crate::schedule::{self, Window};
use crate::secrets;
pub use crate::secrets::format::valid_secret_key;

/// The spec with its durations parsed and its cross-field rules checked.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidSpec {
    pub max_key_age: Duration,
    pub rotate_before: Duration,
    pub rollout_timeout: Duration,
    pub deactivate_after: Duration,
    pub delete_after: Duration,
    pub require_unused_for: Duration,
    /// spec.emergency.maxWait: the longest a leaked key stays Active after the handover.
    pub emergency_max_wait: Duration,
    /// spec.emergency.switchOff.
    pub switch_off: crate::api::SwitchOff,
    /// spec.schedule.windows (empty: a scheduled rotation may start at any time).
    pub windows: Vec<Window>,
    /// How much later than maxKeyAge - rotateBefore the key comes due (`schedule::spread`; zero
    /// for a caller that does not know the resource's uid).
    pub spread: Duration,
    /// The resource's share (`schedule::share` of its uid): its spread, and its place in a window.
    pub share: u32,
}

/// The longest spec.emergency.maxWait: a leaked key Active for longer is no emergency response.
pub const MAX_EMERGENCY_WAIT: Duration = Duration::from_secs(3_600);

/// What to fix, in the user's terms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSpec(pub String);

/// The spec's checks that do not depend on the resource's name (for callers that do not know it);
/// a caller that knows it uses [`validate_for`].
pub fn validate(spec: &IamKeyRotationSpec) -> Result<ValidSpec, InvalidSpec> {
    check(spec, None)
}

/// Every check, including those that need the resource's name: no target may be the resource's
/// own staging Secret, which rekey empties at each rotation start and deletes at its end.
pub fn validate_for(spec: &IamKeyRotationSpec, resource_name: &str) -> Result<ValidSpec, InvalidSpec> {
    check(spec, Some(resource_name))
}

/// Every check, and the resource's spread from its uid: what the reconcile decides with.
pub fn validate_resource(obj: &IamKeyRotation) -> Result<ValidSpec, InvalidSpec> {
    let name = obj.metadata.name.as_deref().unwrap_or_default();
    let mut v = check(&obj.spec, Some(name))?;
    v.share = schedule::share(obj.metadata.uid.as_deref().unwrap_or_default());
    v.spread = schedule::spread(v.share, v.rotate_before);
    Ok(v)
}

fn check(spec: &IamKeyRotationSpec, resource_name: Option<&str>) -> Result<ValidSpec, InvalidSpec> {
    let dur = |field: &str, d: &crate::duration::SpecDuration| {
        d.parse().map_err(|e| InvalidSpec(format!("spec.{field}: {e}")))
    };
    let v = ValidSpec {
        max_key_age: dur("maxKeyAge", &spec.max_key_age)?,
        rotate_before: dur("rotateBefore", &spec.rotate_before)?,
        rollout_timeout: dur("workloads.rolloutTimeout", &spec.workloads.rollout_timeout)?,
        deactivate_after: dur("retirement.deactivateAfter", &spec.retirement.deactivate_after)?,
        delete_after: dur("retirement.deleteAfter", &spec.retirement.delete_after)?,
        require_unused_for: dur("retirement.requireOldKeyUnusedFor", &spec.retirement.require_old_key_unused_for)?,
        emergency_max_wait: dur("emergency.maxWait", &spec.emergency.max_wait)?,
        switch_off: spec.emergency.switch_off,
        windows: windows(spec)?,
        spread: Duration::ZERO,
        share: 0,
    };
    if v.max_key_age.is_zero() {
        return Err(InvalidSpec("spec.maxKeyAge must be more than 0s".into()));
    }
    if v.rollout_timeout.is_zero() {
        return Err(InvalidSpec("spec.workloads.rolloutTimeout must be more than 0s".into()));
    }
    if v.emergency_max_wait.is_zero() || v.emergency_max_wait > MAX_EMERGENCY_WAIT {
        return Err(InvalidSpec(format!(
            "spec.emergency.maxWait ({}) must be between 1s and 1h: it is how long a leaked key may stay Active while the workloads move to the new key (to switch it off without waiting, set spec.emergency.switchOff: Immediately)",
            spec.emergency.max_wait
        )));
    }
    if v.rotate_before >= v.max_key_age {
        return Err(InvalidSpec(format!(
            "spec.rotateBefore ({}) must be less than spec.maxKeyAge ({})",
            spec.rotate_before, spec.max_key_age
        )));
    }
    if !valid_user_name(&spec.user_name) {
        return Err(InvalidSpec(format!(
            "spec.userName {:?} is not an IAM user name (1-64 of letters, digits and +=,.@_-)",
            spec.user_name
        )));
    }
    if spec.secrets.is_empty() || spec.secrets.len() > 16 {
        return Err(InvalidSpec("spec.secrets must list 1 to 16 Secrets".into()));
    }
    let mut names = BTreeSet::new();
    for (i, s) in spec.secrets.iter().enumerate() {
        if !names.insert(s.name.as_str()) {
            return Err(InvalidSpec(format!("spec.secrets[{i}]: Secret {:?} is listed twice", s.name)));
        }
        if let Some(resource) = resource_name.filter(|r| s.name == secrets::staging_name(r)) {
            return Err(InvalidSpec(format!(
                "spec.secrets[{i}]: Secret {:?} is the staging Secret of IamKeyRotation {resource} (rekey empties \
                 and deletes it during each rotation); choose another Secret name",
                s.name
            )));
        }
        secrets::format::of(s.format).validate(i, s).map_err(InvalidSpec)?;
    }
    Ok(v)
}

fn windows(spec: &IamKeyRotationSpec) -> Result<Vec<Window>, InvalidSpec> {
    let listed = spec.schedule.as_ref().map(|s| s.windows.as_slice()).unwrap_or_default();
    listed
        .iter()
        .enumerate()
        .map(|(i, w)| Window::parse(w).map_err(|e| InvalidSpec(format!("spec.schedule.windows[{i}]: {e}"))))
        .collect()
}

/// IAM's user name rule: `[\w+=,.@-]{1,64}`.
pub fn valid_user_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::api::{SecretFormat, SecretTarget};
    use crate::duration::SpecDuration;

    fn spec() -> IamKeyRotationSpec {
        serde_json::from_value(serde_json::json!({
            "userName": "billing-app",
            "secrets": [{"name": "billing-aws"}],
        }))
        .unwrap()
    }

    #[test]
    fn defaults_are_valid() {
        let v = validate(&spec()).unwrap();
        assert_eq!(v.max_key_age, Duration::from_secs(90 * 86_400));
        assert_eq!(v.rotate_before, Duration::from_secs(10 * 86_400));
        assert_eq!(v.delete_after, Duration::from_secs(3_600));
        assert_eq!(v.rollout_timeout, Duration::from_secs(600));
        assert_eq!(v.emergency_max_wait, Duration::from_secs(300));
        assert_eq!(v.switch_off, crate::api::SwitchOff::AfterRollout);
    }

    #[test]
    fn each_rule_names_the_field_to_fix() {
        type Mutation = Box<dyn Fn(&mut IamKeyRotationSpec)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|s| s.max_key_age = SpecDuration::new("0s")), "maxKeyAge must be more than 0s"),
            (Box::new(|s| s.workloads.rollout_timeout = SpecDuration::new("0m")), "rolloutTimeout must be more"),
            (Box::new(|s| s.rotate_before = SpecDuration::new("90d")), "rotateBefore (90d) must be less"),
            (Box::new(|s| s.max_key_age = SpecDuration::new("-1d")), "spec.maxKeyAge: \"-1d\" is not a duration"),
            (Box::new(|s| s.delete_after_mut("1x")), "spec.retirement.deleteAfter"),
            (Box::new(|s| s.user_name = "bad name".into()), "is not an IAM user name"),
            (
                Box::new(|s| s.emergency.max_wait = SpecDuration::new("0s")),
                "spec.emergency.maxWait (0s) must be between 1s and 1h: it is how long a leaked key may stay Active",
            ),
            (Box::new(|s| s.emergency.max_wait = SpecDuration::new("1h1s")), "spec.emergency.maxWait (1h1s) must be"),
            (Box::new(|s| s.emergency.max_wait = SpecDuration::new("5x")), "spec.emergency.maxWait: \"5x\" is not"),
            (Box::new(|s| s.secrets.push(s.secrets[0].clone())), "listed twice"),
            (
                Box::new(|s| s.secrets[0] = SecretTarget { format: SecretFormat::Template, ..s.secrets[0].clone() }),
                "needs a non-empty template map",
            ),
            (
                Box::new(|s| s.secrets[0].secret_access_key_key = Some("AWS_ACCESS_KEY_ID".into())),
                "spec.secrets[0]: accessKeyIdKey and secretAccessKeyKey are both \"AWS_ACCESS_KEY_ID\"",
            ),
            (
                Box::new(|s| s.secrets[0] = template(&[("k", "{{ .AccessKeyId }}")])),
                "spec.secrets[0]: the template uses neither {{ .SecretAccessKey }} nor {{ .SesSmtpPassword }} so no key",
            ),
            (
                Box::new(|s| s.secrets[0] = template(&[("a b", "{{ .SecretAccessKey }}")])),
                "spec.secrets[0].template: \"a b\" is not a valid Secret key",
            ),
            (
                Box::new(|s| s.secrets[0].format = SecretFormat::SesSmtp),
                "spec.secrets[0]: format sesSmtp needs region, the SES region the SMTP password is for",
            ),
            (
                Box::new(|s| s.secrets[0] = template(&[("sasl_passwd", "{{ .AccessKeyId }}:{{ .SesSmtpPassword }}")])),
                "spec.secrets[0]: a template using {{ .SesSmtpPassword }} needs region",
            ),
            (
                Box::new(|s| s.schedule = Some(window("02:00", "02:00", "UTC"))),
                "spec.schedule.windows[0]: start and end are both \"02:00\": the window would be empty",
            ),
            (
                Box::new(|s| s.schedule = Some(window("02:00", "05:00", "Europe/Berln"))),
                "spec.schedule.windows[0]: timeZone \"Europe/Berln\" is not an IANA time zone",
            ),
        ];
        for (mutate, want) in cases {
            let mut s = spec();
            mutate(&mut s);
            let err = validate(&s).expect_err(want);
            assert!(err.0.contains(want), "{err} does not contain {want}");
        }
    }

    fn window(start: &str, end: &str, tz: &str) -> crate::api::ScheduleSpec {
        serde_json::from_value(serde_json::json!({"windows": [{"start": start, "end": end, "timeZone": tz}]})).unwrap()
    }

    fn template(entries: &[(&str, &str)]) -> SecretTarget {
        serde_json::from_value(serde_json::json!({
            "name": "billing-aws",
            "format": "template",
            "template": entries.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<BTreeMap<_, _>>(),
        }))
        .unwrap()
    }

    #[test]
    fn a_target_named_like_the_resources_staging_secret_is_refused() {
        let mut s = spec();
        s.secrets.push(SecretTarget { name: secrets::staging_name("billing"), ..s.secrets[0].clone() });
        let err = validate_for(&s, "billing").unwrap_err();
        assert_eq!(
            err.0,
            "spec.secrets[1]: Secret \"billing-rekey-staging\" is the staging Secret of IamKeyRotation billing \
             (rekey empties and deletes it during each rotation); choose another Secret name"
        );
        // Another resource's name, or a caller that does not know the name: the rule cannot apply.
        assert!(validate_for(&s, "other").is_ok());
        assert!(validate(&s).is_ok());
        assert_eq!(validate_for(&spec(), "billing"), validate(&spec()));
    }

    #[test]
    fn a_valid_template_passes() {
        let mut s = spec();
        s.secrets[0] = template(&[("config.json", "{\"secret\":\"{{ .SecretAccessKey }}\"}")]);
        assert!(validate(&s).is_ok());
    }

    impl IamKeyRotationSpec {
        fn delete_after_mut(&mut self, v: &str) {
            self.retirement.delete_after = SpecDuration::new(v);
        }
    }
}
