//! Which AWS credentials a pod would read from the Secrets its spec references.
//!
//! The simulated kubelet uses this to decide readiness the way an application would fail: a pod
//! holding a key that does not authenticate, or that is not Active, is not Ready.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Container, PodSpec, Secret};

/// An access key pair as an application would read it.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyPair {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Test logs are read too: the secret never appears in them.
        write!(f, "KeyPair({}, <redacted>)", self.access_key_id)
    }
}

/// What a pod's spec yields: the keys it holds, or why it could not start (a referenced Secret or
/// key is missing and not optional, as the kubelet's CreateContainerConfigError).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodCredentials {
    pub keys: BTreeSet<KeyPair>,
    /// Human-readable reasons the pod could not be started or read its credentials.
    pub problems: Vec<String>,
    /// True when the pod's spec references no Secret holding AWS credentials at all.
    pub none_referenced: bool,
}

/// Looks up a Secret of the pod's namespace by name.
pub trait SecretLookup {
    fn secret(&self, name: &str) -> Option<Secret>;
}

impl<F: Fn(&str) -> Option<Secret>> SecretLookup for F {
    fn secret(&self, name: &str) -> Option<Secret> {
        self(name)
    }
}

fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    if let Some(v) = secret.data.as_ref().and_then(|d| d.get(key)) {
        return String::from_utf8(v.0.clone()).ok();
    }
    secret.string_data.as_ref().and_then(|d| d.get(key)).cloned()
}

fn secret_entries(secret: &Secret) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some(d) = &secret.data {
        for (k, v) in d {
            if let Ok(s) = String::from_utf8(v.0.clone()) {
                out.insert(k.clone(), s);
            }
        }
    }
    out
}

/// The containers that run for the pod's life: sidecars (init containers with `restartPolicy:
/// Always`, started before the others and kept running) and the regular containers.
pub fn running_containers(spec: &PodSpec) -> impl Iterator<Item = &Container> {
    spec.init_containers.iter().flatten().filter(|c| is_sidecar(c)).chain(spec.containers.iter())
}

/// A restartable init container (a sidecar, GA in Kubernetes 1.33).
pub fn is_sidecar(c: &Container) -> bool {
    c.restart_policy.as_deref() == Some("Always")
}

/// Credentials from environment variables, fixed when the container starts.
pub fn env_credentials(spec: &PodSpec, secrets: &impl SecretLookup) -> PodCredentials {
    let mut out = PodCredentials::default();
    let mut referenced = false;
    for c in running_containers(spec) {
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        for from in c.env_from.iter().flatten() {
            let Some(sref) = &from.secret_ref else { continue };
            referenced = true;
            let name = &sref.name;
            match secrets.secret(name) {
                Some(s) => {
                    let prefix = from.prefix.clone().unwrap_or_default();
                    for (k, v) in secret_entries(&s) {
                        env.insert(format!("{prefix}{k}"), v);
                    }
                }
                None if sref.optional == Some(true) => {}
                None => out.problems.push(format!("envFrom: secret {name} not found")),
            }
        }
        for e in c.env.iter().flatten() {
            let Some(skr) = e.value_from.as_ref().and_then(|v| v.secret_key_ref.as_ref()) else {
                if let Some(v) = &e.value {
                    env.insert(e.name.clone(), v.clone());
                }
                continue;
            };
            referenced = true;
            let name = &skr.name;
            match secrets.secret(name).and_then(|s| secret_value(&s, &skr.key)) {
                Some(v) => {
                    env.insert(e.name.clone(), v);
                }
                None if skr.optional == Some(true) => {}
                None => out.problems.push(format!("env {}: key {} of secret {name} not found", e.name, skr.key)),
            }
        }
        match (env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")) {
            (Some(id), Some(secret)) => {
                out.keys.insert(KeyPair { access_key_id: id.clone(), secret_access_key: secret.clone() });
            }
            (None, None) => {}
            _ => out.problems.push(format!("container {}: only half of an AWS key pair in env", c.name)),
        }
    }
    out.none_referenced = !referenced;
    out
}

/// Credentials from mounted files, re-read on every check (an application that reloads its file).
pub fn file_credentials(spec: &PodSpec, secrets: &impl SecretLookup) -> PodCredentials {
    let mut out = PodCredentials { none_referenced: true, ..Default::default() };
    // (secret name, selected keys or all, optional)
    let mut sources: Vec<(String, Option<Vec<String>>, bool)> = Vec::new();
    for v in spec.volumes.iter().flatten() {
        if let Some(s) = &v.secret
            && let Some(name) = &s.secret_name
        {
            let items = s.items.as_ref().map(|i| i.iter().map(|k| k.key.clone()).collect());
            sources.push((name.clone(), items, s.optional == Some(true)));
        }
        if let Some(p) = &v.projected {
            for src in p.sources.iter().flatten() {
                if let Some(s) = &src.secret {
                    let items = s.items.as_ref().map(|i| i.iter().map(|k| k.key.clone()).collect());
                    sources.push((s.name.clone(), items, s.optional == Some(true)));
                }
            }
        }
    }
    for (name, items, optional) in sources {
        out.none_referenced = false;
        let Some(secret) = secrets.secret(&name) else {
            if !optional {
                out.problems.push(format!("volume: secret {name} not found"));
            }
            continue;
        };
        let entries = secret_entries(&secret);
        let selected: BTreeMap<String, String> = match items {
            Some(keys) => entries.into_iter().filter(|(k, _)| keys.contains(k)).collect(),
            None => entries,
        };
        // A Secret in env format mounted as files: one file per variable.
        if let (Some(id), Some(s)) = (selected.get("AWS_ACCESS_KEY_ID"), selected.get("AWS_SECRET_ACCESS_KEY")) {
            out.keys.insert(KeyPair { access_key_id: id.trim().to_owned(), secret_access_key: s.trim().to_owned() });
        }
        for text in selected.values() {
            out.keys.extend(parse_credentials_text(text));
        }
    }
    out
}

/// Key pairs found in a file's text: an INI credentials file (every profile), dotenv lines, or a
/// JSON object, which covers what the credentialsFile and template formats produce.
pub fn parse_credentials_text(text: &str) -> Vec<KeyPair> {
    let mut found = Vec::new();
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(text) {
        let get = |names: &[&str]| {
            map.iter()
                .find(|(k, _)| names.iter().any(|n| k.eq_ignore_ascii_case(n)))
                .and_then(|(_, v)| v.as_str().map(str::to_owned))
        };
        if let (Some(id), Some(s)) = (
            get(&["accessKeyId", "aws_access_key_id", "AWS_ACCESS_KEY_ID"]),
            get(&["secretAccessKey", "aws_secret_access_key", "AWS_SECRET_ACCESS_KEY"]),
        ) {
            found.push(KeyPair { access_key_id: id, secret_access_key: s });
        }
        return found;
    }
    let mut id: Option<String> = None;
    let mut secret: Option<String> = None;
    let mut flush = |id: &mut Option<String>, secret: &mut Option<String>| {
        if let (Some(i), Some(s)) = (id.take(), secret.take()) {
            found.push(KeyPair { access_key_id: i, secret_access_key: s });
        }
    };
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            flush(&mut id, &mut secret);
            continue;
        }
        let Some((k, v)) = line.split_once('=') else { continue };
        let k = k.trim().trim_start_matches("export ").trim();
        let v = v.trim().trim_matches('"').to_owned();
        if k.eq_ignore_ascii_case("aws_access_key_id") {
            id = Some(v);
        } else if k.eq_ignore_ascii_case("aws_secret_access_key") {
            secret = Some(v);
        }
    }
    flush(&mut id, &mut secret);
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ini_with_two_profiles_yields_both() {
        let text = "[default]\naws_access_key_id = AKIA1\naws_secret_access_key = s1\n\n[other]\naws_access_key_id=AKIA2\naws_secret_access_key=s2\n";
        let keys = parse_credentials_text(text);
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].access_key_id, "AKIA1");
        assert_eq!(keys[1].secret_access_key, "s2");
    }

    #[test]
    fn json_and_dotenv_are_read() {
        let keys = parse_credentials_text(r#"{"accessKeyId": "AKIA3", "secretAccessKey": "s3"}"#);
        assert_eq!(keys[0].access_key_id, "AKIA3");
        let keys = parse_credentials_text("export AWS_ACCESS_KEY_ID=AKIA4\nAWS_SECRET_ACCESS_KEY=\"s4\"\n");
        assert_eq!(keys[0].secret_access_key, "s4");
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let k = KeyPair { access_key_id: "AKIA5".into(), secret_access_key: "very-secret".into() };
        assert!(!format!("{k:?}").contains("very-secret"));
    }
}
