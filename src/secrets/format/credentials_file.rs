//! credentialsFile: one Secret key `credentials` holding an AWS shared credentials file (INI), for
//! mounting as `~/.aws/credentials`. rekey owns one profile section of it: rendering replaces (or
//! appends) that section and keeps every other line as it was, so several resources, or a person,
//! may keep other profiles in the same file. Which resource writes a profile is recorded in an
//! annotation `rekey.dev/profile.<profile>` on the Secret.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use secrecy::{ExposeSecret as _, SecretString};

use super::{Format, value};
use crate::api::SecretTarget;
use crate::ownership::fnv1a;
use crate::plan::snapshot::SecretState;
use crate::secrets::{AccessKey, RenderContext, field_manager};

pub const CREDENTIALS_KEY: &str = "credentials";

pub struct CredentialsFile;

fn profile(t: &SecretTarget) -> &str {
    t.profile.as_deref().unwrap_or("default")
}

/// The annotation naming the resource that writes `profile`. An annotation name (after the
/// prefix) is at most 63 characters and ends alphanumeric, while a profile may be 64 long and end
/// in `-`, `.` or `_`: such a profile is cut and given a hash, which keeps distinct profiles apart.
pub fn profile_annotation(profile: &str) -> String {
    let name = format!("profile.{profile}");
    if name.len() <= 63 && name.ends_with(|c: char| c.is_ascii_alphanumeric()) {
        return format!("rekey.dev/{name}");
    }
    let cut: String = profile.chars().take(45).collect();
    format!("rekey.dev/profile.{cut}-{:08x}", fnv1a(profile.as_bytes()))
}

/// The resource named by the profile's annotation, if any.
fn claimant<'a>(t: &SecretTarget, s: &'a Secret) -> Option<&'a str> {
    s.metadata.annotations.as_ref()?.get(&profile_annotation(profile(t))).map(String::as_str)
}

/// The name in a section header line, if the line is one.
fn section(line: &str) -> Option<&str> {
    line.trim().strip_prefix('[').and_then(|l| l.strip_suffix(']')).map(str::trim)
}

/// Whether a section name is `profile`. `[profile x]` is accepted too: it is how the AWS config
/// file names sections, so a section copied from there still reads (and is the one replaced).
fn is_profile(name: &str, profile: &str) -> bool {
    name == profile || name.strip_prefix("profile ").map(str::trim) == Some(profile)
}

/// An INI credentials file's pair for `profile`.
fn ini_pair(text: &str, profile: &str) -> (Option<String>, Option<String>) {
    let mut in_section = false;
    let (mut id, mut secret) = (None, None);
    for line in text.lines() {
        if let Some(name) = section(line) {
            in_section = is_profile(name, profile);
            continue;
        }
        if !in_section {
            continue;
        }
        if let Some((k, v)) = line.trim().split_once('=') {
            match k.trim() {
                "aws_access_key_id" => id = Some(v.trim().to_owned()),
                "aws_secret_access_key" => secret = Some(v.trim().to_owned()),
                _ => {}
            }
        }
    }
    (id, secret)
}

/// The lines of `text` (with their line ends) without any section for `profile`, and where the
/// first such section stood. Blank and comment lines that end a cut section are kept: they
/// usually introduce the section that follows.
fn cut(text: &str, profile: &str) -> (Vec<String>, Option<usize>) {
    let (mut out, mut at, mut trailing) = (Vec::new(), None, Vec::new());
    let mut in_profile = false;
    for line in text.split_inclusive('\n') {
        if let Some(name) = section(line) {
            out.append(&mut trailing);
            in_profile = is_profile(name, profile);
            if in_profile {
                at.get_or_insert(out.len());
            } else {
                out.push(line.to_owned());
            }
        } else if !in_profile {
            out.push(line.to_owned());
        } else if line.trim().is_empty() || line.trim_start().starts_with(['#', ';']) {
            trailing.push(line.to_owned());
        } else {
            // A setting of the cut section: the blank and comment lines before it were inside it.
            trailing.clear();
        }
    }
    out.append(&mut trailing);
    (out, at)
}

/// `text` with the section for `profile` replaced by `section_text`, or `section_text` appended.
fn splice(text: &str, profile: &str, section_text: &str) -> String {
    let (mut lines, at) = cut(text, profile);
    match at {
        Some(i) => lines.insert(i, section_text.to_owned()),
        None => {
            if let Some(last) = lines.last_mut().filter(|l| !l.ends_with('\n')) {
                last.push_str(newline(text));
            }
            if lines.last().is_some_and(|l| !l.trim().is_empty()) {
                lines.push(newline(text).to_owned());
            }
            lines.push(section_text.to_owned());
        }
    }
    lines.concat()
}

/// The line end the file already uses, so a Windows-edited file stays one.
fn newline(text: &str) -> &'static str {
    if text.contains("\r\n") { "\r\n" } else { "\n" }
}

impl Format for CredentialsFile {
    fn render(
        &self,
        t: &SecretTarget,
        key: &AccessKey,
        _: &RenderContext,
        existing: Option<&Secret>,
    ) -> BTreeMap<String, SecretString> {
        let text = existing.and_then(|s| value(s, CREDENTIALS_KEY)).unwrap_or_default();
        let nl = newline(&text);
        let section_text = format!(
            "[{}]{nl}aws_access_key_id = {}{nl}aws_secret_access_key = {}{nl}",
            profile(t),
            key.id,
            key.secret.expose_secret()
        );
        let merged = splice(&text, profile(t), &section_text);
        BTreeMap::from([(CREDENTIALS_KEY.to_owned(), SecretString::from(merged))])
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

    fn shared(&self) -> bool {
        true
    }

    fn claims(&self, t: &SecretTarget, resource: &str) -> BTreeMap<String, String> {
        BTreeMap::from([(profile_annotation(profile(t)), resource.to_owned())])
    }

    fn conflict(&self, t: &SecretTarget, s: &Secret, own_manager: &str, live: &dyn Fn(&str) -> bool) -> Option<String> {
        // Compared as field managers: a long resource name is hashed in the manager, not here.
        let other = claimant(t, s).filter(|r| field_manager(r) != own_manager && live(r))?;
        Some(format!(
            "Secret {}: profile {} of key {CREDENTIALS_KEY} is written by IamKeyRotation {other} (annotation {}); \
             resources sharing a credentials file must each use their own profile",
            t.name,
            profile(t),
            profile_annotation(profile(t))
        ))
    }

    fn without(&self, t: &SecretTarget, s: &Secret, resource: &str) -> BTreeMap<String, SecretString> {
        let text = value(s, CREDENTIALS_KEY).unwrap_or_default();
        // A profile another resource has taken over is theirs to remove, not ours.
        let rest = if claimant(t, s).is_some_and(|r| r != resource) { text } else { cut(&text, profile(t)).0.concat() };
        if rest.trim().is_empty() {
            return BTreeMap::new();
        }
        BTreeMap::from([(CREDENTIALS_KEY.to_owned(), SecretString::from(rest))])
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
        let s = secret_of(CredentialsFile.render(&t, &key(), &RenderContext::default(), None));
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

    fn profiled(profile: &str) -> SecretTarget {
        SecretTarget { profile: Some(profile.into()), ..target(SecretFormat::CredentialsFile) }
    }

    fn rendered(t: &SecretTarget, existing: &str) -> String {
        let out = CredentialsFile.render(t, &key(), &RenderContext::default(), Some(&credentials(existing)));
        out[CREDENTIALS_KEY].expose_secret().to_owned()
    }

    const OURS: &str = "[billing]\naws_access_key_id = AKIAEXAMPLE\naws_secret_access_key = s3cr3t/+=\n";

    #[test]
    fn rendering_replaces_only_the_targets_profile_and_keeps_every_other_line() {
        let before = "# managed by hand\n[default]\naws_access_key_id = AKIADEF\naws_secret_access_key = d\n\n\
                      # the billing account\n[billing]\naws_access_key_id = AKIAOLD\n\n# stale\n\
                      aws_secret_access_key = old\n\n# next: reports\n[reports]\naws_access_key_id=AKIAR\n";
        let after = rendered(&profiled("billing"), before);
        let want = format!(
            "# managed by hand\n[default]\naws_access_key_id = AKIADEF\naws_secret_access_key = d\n\n\
             # the billing account\n{OURS}\n# next: reports\n[reports]\naws_access_key_id=AKIAR\n"
        );
        assert_eq!(after, want);
        let s = credentials(&after);
        assert_eq!(CredentialsFile.held(&profiled("default"), &s), SecretState::Holds("AKIADEF".into()));
        assert_eq!(CredentialsFile.held(&profiled("billing"), &s), SecretState::Holds("AKIAEXAMPLE".into()));
        // Rendering again changes nothing: a rotation's retry is idempotent.
        assert_eq!(rendered(&profiled("billing"), &after), after);
    }

    #[test]
    fn a_missing_profile_is_appended_after_the_others() {
        let t = profiled("billing");
        assert_eq!(rendered(&t, ""), OURS);
        assert_eq!(rendered(&t, "[default]\nx = 1"), format!("[default]\nx = 1\n\n{OURS}"));
        assert_eq!(rendered(&t, "[default]\nx = 1\n\n"), format!("[default]\nx = 1\n\n{OURS}"));
        let none = CredentialsFile.render(&t, &key(), &RenderContext::default(), Some(&Secret::default()));
        assert_eq!(none[CREDENTIALS_KEY].expose_secret(), OURS);
    }

    #[test]
    fn a_config_style_or_repeated_section_of_the_profile_is_replaced_once() {
        let before =
            "[profile billing]\naws_access_key_id = A1\n[default]\nk = v\n[ billing ]\naws_access_key_id = A2\n";
        assert_eq!(rendered(&profiled("billing"), before), format!("{OURS}[default]\nk = v\n"));
    }

    #[test]
    fn a_file_with_windows_line_ends_keeps_them() {
        let after = rendered(&profiled("billing"), "[default]\r\nk = v\r\n");
        assert_eq!(after, format!("[default]\r\nk = v\r\n\r\n{}", OURS.replace('\n', "\r\n")));
        assert_eq!(
            CredentialsFile.held(&profiled("billing"), &credentials(&after)),
            SecretState::Holds("AKIAEXAMPLE".into())
        );
    }

    #[test]
    fn profile_annotations_are_valid_annotation_names_and_distinct() {
        assert_eq!(profile_annotation("billing"), "rekey.dev/profile.billing");
        let valid = |a: &str| {
            let name = a.strip_prefix("rekey.dev/").unwrap();
            name.len() <= 63
                && name.starts_with(|c: char| c.is_ascii_alphanumeric())
                && name.ends_with(|c: char| c.is_ascii_alphanumeric())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
        };
        let profiles =
            ["billing", "a-", "a_", "a.", &"p".repeat(55), &"p".repeat(56), &"p".repeat(64), &"q".repeat(64)];
        let names: std::collections::BTreeSet<String> = profiles.iter().map(|p| profile_annotation(p)).collect();
        assert_eq!(names.len(), profiles.len(), "{names:?}");
        assert!(names.iter().all(|n| valid(n)), "{names:?}");
    }

    fn claimed(text: &str, claims: &[(&str, &str)]) -> Secret {
        let mut s = credentials(text);
        let a = claims.iter().map(|(p, r)| (profile_annotation(p), (*r).to_owned())).collect();
        s.metadata.annotations = Some(a);
        s
    }

    #[test]
    fn a_conflict_is_the_profiles_annotation_naming_another_resource() {
        let t = profiled("billing");
        let s = claimed("", &[("billing", "other"), ("default", "mine")]);
        let why = CredentialsFile.conflict(&t, &s, "rekey/mine", &|_| true).unwrap();
        assert_eq!(
            why,
            "Secret s: profile billing of key credentials is written by IamKeyRotation other (annotation \
             rekey.dev/profile.billing); resources sharing a credentials file must each use their own profile"
        );
        assert_eq!(CredentialsFile.conflict(&t, &s, "rekey/other", &|_| true), None, "its own claim");
        assert_eq!(
            CredentialsFile.conflict(&profiled("reports"), &s, "rekey/mine", &|_| true),
            None,
            "an unclaimed profile"
        );
        assert_eq!(CredentialsFile.conflict(&profiled("default"), &s, "rekey/mine", &|_| true), None);
        assert_eq!(
            CredentialsFile.claims(&t, "mine"),
            BTreeMap::from([("rekey.dev/profile.billing".into(), "mine".into())])
        );
    }

    #[test]
    fn removal_takes_out_only_the_resources_own_profile() {
        let t = profiled("billing");
        let both = format!("[default]\nk = v\n{OURS}");
        let kept = |s: &Secret, r: &str| {
            CredentialsFile.without(&t, s, r).get(CREDENTIALS_KEY).map(|v| v.expose_secret().to_owned())
        };
        assert_eq!(kept(&claimed(&both, &[("billing", "mine")]), "mine"), Some("[default]\nk = v\n".into()));
        // Written before claims existed: still rekey's to remove.
        assert_eq!(kept(&credentials(&both), "mine"), Some("[default]\nk = v\n".into()));
        assert_eq!(kept(&claimed(&both, &[("billing", "other")]), "mine"), Some(both.clone()), "another's profile");
        assert_eq!(kept(&claimed(OURS, &[("billing", "mine")]), "mine"), None, "nothing left: the key goes");
        assert_eq!(kept(&Secret::default(), "mine"), None);
    }
}
