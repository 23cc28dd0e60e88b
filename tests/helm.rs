//! The Helm chart `deploy/chart/rekey`, under Helm 3.17.3 and Helm 4.1.4 (both provisioned by
//! `scripts/testenv provision`, exported as REKEY_HELM3 / REKEY_HELM4): lint and schema, the same
//! objects as the kustomize install (one source of truth), every option accepted by the apiserver,
//! and install → a full rotation with the chart's ServiceAccount → upgrade → uninstall on the real
//! control plane.

mod support;

use std::path::PathBuf;

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, Role};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, GroupVersionKind, ListParams, PostParams};
use kube::discovery::ApiResource;
use rekey::api::{IamKeyRotation, Phase};
use rekey_testenv::env::{TestEnv, eventually};
use serde_json::{Value, json};
use support::*;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/chart/rekey");

/// One of the two Helm binaries, with a home of its own (cache, config, data: Helm 3 and 4 share no
/// state, and nothing of the user's ~/.config/helm is read).
struct Helm {
    bin: PathBuf,
    major: u8,
    version: &'static str,
    home: PathBuf,
}

impl Helm {
    /// `major` 3 or 4. Never skipped: a missing binary fails the test with what to run.
    async fn get(major: u8) -> anyhow::Result<Self> {
        let (var, version) = match major {
            3 => ("REKEY_HELM3", "v3.17.3"),
            _ => ("REKEY_HELM4", "v4.1.4"),
        };
        let how = "run scripts/testenv provision, then eval \"$(scripts/testenv env)\"";
        let bin = PathBuf::from(std::env::var(var).with_context(|| format!("{var} is not set: {how}"))?);
        anyhow::ensure!(bin.is_file(), "{var}={} does not exist: {how}", bin.display());
        let home = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("helm-{version}"));
        let helm = Self { bin, major, version, home };
        let got = helm.ok(&["version", "--template", "{{.Version}}"]).await?;
        anyhow::ensure!(got.trim() == version, "{var} is helm {got}, not {version}: {how}");
        Ok(helm)
    }

    async fn run(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        let out = tokio::process::Command::new(&self.bin)
            .args(args)
            .env("HELM_CACHE_HOME", self.home.join("cache"))
            .env("HELM_CONFIG_HOME", self.home.join("config"))
            .env("HELM_DATA_HOME", self.home.join("data"))
            .output()
            .await
            .with_context(|| format!("run {}", self.bin.display()))?;
        Ok(out)
    }

    /// Runs `helm args`, which must succeed; its stdout.
    async fn ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.run(args).await?;
        anyhow::ensure!(
            out.status.success(),
            "helm {} ({}) failed: {}{}",
            args.join(" "),
            self.version,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Runs `helm args`, which must fail; its stderr.
    async fn fails(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.run(args).await?;
        anyhow::ensure!(!out.status.success(), "helm {} ({}) succeeded; it must fail", args.join(" "), self.version);
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// [`Helm::ok`] with the arguments of one line, split at whitespace; the word `CHART` stands for
    /// the chart's path (which may hold a space).
    async fn sh(&self, line: &str) -> anyhow::Result<String> {
        let args: Vec<&str> = line.split_whitespace().map(|w| if w == "CHART" { CHART } else { w }).collect();
        self.ok(&args).await
    }

    /// `helm template release CHART -n ns -f <values>`, as JSON objects.
    async fn template(&self, release: &str, ns: &str, values: &Value) -> anyhow::Result<Vec<Value>> {
        let file = values_file(values)?;
        let out = self.ok(&["template", release, CHART, "--namespace", ns, "--values", &file]).await?;
        documents(&out)
    }
}

/// Uninstalls a release when a test fails before its own `helm uninstall` (the control plane is
/// shared: a failed run leaves no Deployment or cluster-wide object behind).
struct ReleaseGuard<'a> {
    helm: &'a Helm,
    release: String,
    armed: bool,
}

impl Drop for ReleaseGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::process::Command::new(&self.helm.bin)
                .args(["uninstall", &self.release, "--namespace", &self.release])
                .env("HELM_CACHE_HOME", self.helm.home.join("cache"))
                .env("HELM_CONFIG_HOME", self.helm.home.join("config"))
                .env("HELM_DATA_HOME", self.helm.home.join("data"))
                .output();
        }
    }
}

/// `values` (JSON is YAML) in a file of its own, for `--values`.
fn values_file(values: &Value) -> anyhow::Result<String> {
    let path =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{}.values.json", rekey_testenv::env::unique("helm")));
    std::fs::write(&path, serde_json::to_vec_pretty(values)?)?;
    Ok(path.to_str().context("path")?.to_owned())
}

/// The objects of a multi-document YAML stream (empty documents dropped).
fn documents(text: &str) -> anyhow::Result<Vec<Value>> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text)?;
    Ok(docs.into_iter().filter(|v| !v.is_null()).collect())
}

fn find<'a>(objects: &'a [Value], kind: &str) -> anyhow::Result<&'a Value> {
    objects.iter().find(|o| o["kind"] == kind).with_context(|| format!("no {kind} rendered"))
}

fn env_value(container: &Value, name: &str) -> Option<String> {
    let env = container["env"].as_array()?;
    env.iter().find(|e| e["name"] == name).and_then(|e| e["value"].as_str()).map(str::to_owned)
}

// ---------------------------------------------------------------------------------------------------
// One source of truth: the chart renders what `kubectl kustomize deploy/` renders.
//
// Both installs are rendered by their own tools and compared as parsed objects, not as text, so
// comments, key order, flow or block style and quoting never matter, and any difference in a field
// that reaches the apiserver does, in either direction (an object or a field only one side has
// fails too). The chart is rendered as the release "rekey" in "rekey-system" (the names the
// kustomize install uses) with the values deploy/settings/ sets, read from the kustomize output
// itself (image, IRSA role, cluster name, region), so everything else is compared with the chart's
// defaults. Exactly these differences are allowed, and removed before comparing:
// - the labels only a Helm release carries (below), in metadata, selectors and pod templates;
// - the order of the container's environment (kustomize appends the settings' variables after a
//   strategic merge; no variable refers to another, so the order means nothing);
// - the Namespace object, which only kustomize ships (Helm creates the release namespace).
// Generating deploy/base from the chart instead was rejected: the kustomize tree is meant to be
// read and patched by users (deploy/settings is a Component), and a generated tree would lose that.
// ---------------------------------------------------------------------------------------------------

/// Labels a Helm release adds that the kustomize install does not have.
const HELM_ONLY_LABELS: [&str; 4] =
    ["app.kubernetes.io/instance", "app.kubernetes.io/version", "app.kubernetes.io/managed-by", "helm.sh/chart"];

fn normalize(v: &Value) -> Value {
    fn strip(v: &mut Value) {
        match v {
            Value::Object(m) => {
                for l in HELM_ONLY_LABELS {
                    m.remove(l);
                }
                for (_, x) in m.iter_mut() {
                    strip(x);
                }
                if m.get("labels").is_some_and(|l| l.as_object().is_some_and(|l| l.is_empty())) {
                    m.remove("labels");
                }
            }
            Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut v = v.clone();
    strip(&mut v);
    if let Some(cs) = v.pointer_mut("/spec/template/spec/containers").and_then(|c| c.as_array_mut()) {
        for c in cs {
            if let Some(env) = c.get_mut("env").and_then(|e| e.as_array_mut()) {
                env.sort_by_key(|e| e["name"].as_str().unwrap_or_default().to_owned());
            }
        }
    }
    v
}

/// Every path where `a` (the chart) and `b` (kustomize) differ.
fn differences(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, xv) in x {
                match y.get(k) {
                    Some(yv) => differences(&format!("{path}.{k}"), xv, yv, out),
                    None => out.push(format!("{path}.{k}: only the chart has it: {xv}")),
                }
            }
            for (k, yv) in y {
                if !x.contains_key(k) {
                    out.push(format!("{path}.{k}: only kustomize has it: {yv}"));
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (xv, yv)) in x.iter().zip(y).enumerate() {
                differences(&format!("{path}[{i}]"), xv, yv, out);
            }
        }
        (Value::String(x), Value::String(y)) if x != y => {
            // Long strings (the dashboard): where they part.
            let at = x.chars().zip(y.chars()).take_while(|(p, q)| p == q).count();
            let tail = |s: &str| s.chars().skip(at.saturating_sub(20)).take(60).collect::<String>();
            out.push(format!(
                "{path}: differs at character {at}: the chart has {:?}…, kustomize {:?}…",
                tail(x),
                tail(y)
            ));
        }
        _ if a != b => out.push(format!("{path}: the chart has {a}, kustomize {b}")),
        _ => {}
    }
}

fn key(v: &Value) -> String {
    format!(
        "{} {}/{}",
        v["kind"].as_str().unwrap_or("?"),
        v["metadata"]["namespace"].as_str().unwrap_or(""),
        v["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// The chart's objects and kustomize's are the same objects, field by field (after [`normalize`]).
fn same_objects(what: &str, chart: &[Value], kustomize: &[Value]) -> anyhow::Result<()> {
    use std::collections::BTreeMap;
    let c: BTreeMap<String, Value> = chart.iter().map(|v| (key(v), normalize(v))).collect();
    let k: BTreeMap<String, Value> =
        kustomize.iter().filter(|v| v["kind"] != "Namespace").map(|v| (key(v), normalize(v))).collect();
    let mut diffs = Vec::new();
    for (name, cv) in &c {
        match k.get(name) {
            Some(kv) => differences(name, cv, kv, &mut diffs),
            None => diffs.push(format!("{name}: only the chart renders it")),
        }
    }
    diffs.extend(k.keys().filter(|n| !c.contains_key(*n)).map(|n| format!("{n}: only kustomize renders it")));
    anyhow::ensure!(
        diffs.is_empty(),
        "{what}: the chart (deploy/chart/rekey) and the kustomize install (deploy/) have drifted apart; \
         change both:\n  {}",
        diffs.join("\n  ")
    );
    Ok(())
}

/// The values that make the chart render what deploy/settings/ makes kustomize render, read from
/// kustomize's own output.
fn settings_values(kustomized: &[Value]) -> anyhow::Result<Value> {
    let c = &find(kustomized, "Deployment")?["spec"]["template"]["spec"]["containers"][0];
    let image = c["image"].as_str().context("image")?;
    let image = match image.split_once('@') {
        Some((repository, digest)) => json!({"repository": repository, "digest": digest}),
        None => {
            let (repository, tag) = image.rsplit_once(':').context("image tag")?;
            json!({"repository": repository, "tag": tag})
        }
    };
    let sa = find(kustomized, "ServiceAccount")?;
    Ok(json!({
        "clusterName": env_value(c, "REKEY_CLUSTER_NAME").context("REKEY_CLUSTER_NAME")?,
        "awsRegion": env_value(c, "AWS_REGION").context("AWS_REGION")?,
        "image": image,
        "serviceAccount": {"roleArn": sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]},
    }))
}

async fn renders_what_kustomize_installs(helm: &Helm) -> anyhow::Result<()> {
    let cluster_wide = kustomize("")?;
    let values = settings_values(&cluster_wide)?;
    let chart = helm.template("rekey", OPERATOR_NS, &values).await?;
    same_objects("cluster-wide mode (deploy/)", &chart, &cluster_wide)?;

    let mut namespaced_values = values.clone();
    namespaced_values["mode"] = json!("namespaced");
    namespaced_values["watchNamespaces"] = json!(["team-a"]);
    let chart = helm.template("rekey", OPERATOR_NS, &namespaced_values).await?;
    same_objects("namespaced mode (deploy/namespaced/)", &chart, &kustomize("namespaced")?)?;

    let mut monitoring_values = values;
    monitoring_values["monitoring"] = json!({
        "serviceMonitor": {"enabled": true}, "prometheusRule": {"enabled": true}, "grafanaDashboard": {"enabled": true},
    });
    let monitoring_kinds = ["ServiceMonitor", "PrometheusRule", "ConfigMap"];
    let chart: Vec<Value> = helm
        .template("rekey", OPERATOR_NS, &monitoring_values)
        .await?
        .into_iter()
        .filter(|o| monitoring_kinds.iter().any(|k| o["kind"] == *k))
        .collect();
    same_objects("monitoring (deploy/monitoring/)", &chart, &kustomize("monitoring")?)
}

// ---------------------------------------------------------------------------------------------------
// Lint and schema
// ---------------------------------------------------------------------------------------------------

async fn lint_and_schema(helm: &Helm) -> anyhow::Result<()> {
    for values in [
        json!({"clusterName": "prod"}),
        json!({"clusterName": "prod", "mode": "namespaced", "watchNamespaces": ["team-a", "team-b"]}),
        everything_values(&["team-a", "team-b"]),
    ] {
        let file = values_file(&values)?;
        let out = helm.ok(&["lint", "--strict", CHART, "--values", &file]).await?;
        assert!(out.contains("0 chart(s) failed"), "{}: helm lint --strict with {values}: {out}", helm.version);
    }
    let rejected = |values: Value, wanted: &'static str| async move {
        let file = values_file(&values)?;
        let err = helm.fails(&["template", "r", CHART, "--values", &file]).await?;
        assert!(err.contains(wanted), "{}: {values} is rejected, naming {wanted:?}: {err}", helm.version);
        anyhow::Ok(err)
    };
    // The schema: a value of the wrong type, outside an enum, an unknown key, a missing list.
    let err = rejected(json!({"clusterName": "prod", "replicas": "two"}), "replicas").await?;
    assert!(err.contains("values don't meet the specifications of the schema"), "{}: {err}", helm.version);
    rejected(json!({"clusterName": "prod", "mode": "cluster"}), "mode").await?;
    rejected(json!({"clusterName": "prod", "replica": 2}), "replica").await?;
    rejected(json!({"clusterName": "prod", "image": {"pullPolicy": "Sometimes"}}), "pullPolicy").await?;
    rejected(json!({"clusterName": "prod", "mode": "namespaced"}), "watchNamespaces").await?;
    rejected(json!({"clusterName": "prod", "serviceAccount": {"roleArn": "my-role"}}), "roleArn").await?;
    rejected(json!({"clusterName": "prod", "monitoring": {"runbookBaseUrl": "docs.md#x"}}), "runbookBaseUrl").await?;
    // clusterName: the template's message when it is left empty (values.yaml's default), the
    // schema's when it is removed (null).
    let err = rejected(json!({}), "clusterName is required: set it to this cluster's name").await?;
    assert!(err.contains("rekey.dev/allow/<namespace>"), "the message says what the name is for: {err}");
    rejected(json!({"clusterName": null}), "clusterName").await?;
    // lint --strict applies the schema as well.
    let file = values_file(&json!({"clusterName": "prod", "replicas": "two"}))?;
    let out = helm.run(&["lint", "--strict", CHART, "--values", &file]).await?;
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success() && all.contains("replicas"), "{}: lint rejects the bad value: {all}", helm.version);
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// Every option
// ---------------------------------------------------------------------------------------------------

fn everything_values(watched: &[&str]) -> Value {
    json!({
        "clusterName": "everything",
        "mode": "namespaced",
        "watchNamespaces": watched,
        "replicas": 3,
        "image": {"repository": "example/rekey", "digest": format!("sha256:{}", "ab".repeat(32)), "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "pull"}],
        "serviceAccount": {"roleArn": "arn:aws:iam::111122223333:role/rekey", "annotations": {"team": "platform"}},
        "awsRegion": "eu-west-1",
        "logFormat": "text",
        "metricsPort": 9090,
        "allowedRoleArns": ["arn:aws:iam::*:role/rekey/*", "arn:aws:iam::444455556666:role/x"],
        "maxConcurrentRotations": 5,
        "awsCallsPerSecond": 4,
        "awsCallsPerSecondTotal": 8,
        "awsEventsQueueUrl": "https://sqs.eu-west-1.amazonaws.com/111122223333/rekey-aws-events",
        "extraEnv": [{"name": "RUST_LOG", "value": "debug"}],
        "resources": {"requests": {"cpu": "50m", "memory": "100Mi"}, "limits": {"memory": "300Mi"}},
        "podSecurityContext": {"runAsNonRoot": true, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
        "securityContext": {"readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}},
        "terminationGracePeriodSeconds": 90,
        "priorityClassName": "system-cluster-critical",
        "podAnnotations": {"a": "b"},
        "podLabels": {"team": "platform"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 1, "preference": {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["ops"]}]}}]}},
        "podDisruptionBudget": {"maxUnavailable": 2},
        "networkPolicy": {"enabled": true, "egressHttpsPorts": [443], "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]},
        "monitoring": {
            "labels": {"release": "kube-prometheus-stack"},
            "runbookBaseUrl": "https://wiki.example.com/rekey/runbooks",
            "serviceMonitor": {"enabled": true, "interval": "1m", "labels": {"scraped-by": "platform"}},
            "prometheusRule": {"enabled": true, "labels": {"team": "sre"}},
            "grafanaDashboard": {"enabled": true},
        },
    })
}

async fn every_option_renders_and_is_accepted(helm: &Helm) -> anyhow::Result<()> {
    let env = TestEnv::get().await?;
    let rel_ns = env.namespace(&format!("helm{}-all", helm.major)).await?;
    let (a, b) = (env.namespace("helm-watched").await?, env.namespace("helm-watched").await?);
    let values = everything_values(&[&a, &b]);
    let objects = helm.template("everything", &rel_ns, &values).await?;
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_rekey")).args(["run", "--help"]).output()?;
    let help = String::from_utf8(help.stdout)?;

    let d = find(&objects, "Deployment")?;
    assert_eq!(d["spec"]["replicas"], 3);
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(pod["priorityClassName"], "system-cluster-critical");
    assert_eq!(pod["nodeSelector"], values["nodeSelector"]);
    assert_eq!(pod["tolerations"], values["tolerations"]);
    assert_eq!(pod["affinity"], values["affinity"]);
    assert_eq!(pod["securityContext"], values["podSecurityContext"]);
    assert_eq!(pod["imagePullSecrets"], values["imagePullSecrets"]);
    assert_eq!(pod["terminationGracePeriodSeconds"], 90);
    assert_eq!(pod["serviceAccountName"], "everything-rekey");
    assert_eq!(d["spec"]["template"]["metadata"]["labels"]["team"], "platform");
    assert_eq!(d["spec"]["template"]["metadata"]["annotations"]["a"], "b");
    let spread = &pod["topologySpreadConstraints"][0];
    assert_eq!(spread["topologyKey"], "kubernetes.io/hostname", "replicas > 1 spread over nodes");
    assert_eq!(spread["labelSelector"]["matchLabels"], d["spec"]["selector"]["matchLabels"]);
    let c = &pod["containers"][0];
    assert_eq!(c["image"], format!("example/rekey@sha256:{}", "ab".repeat(32)), "the digest, not the tag");
    assert_eq!(c["imagePullPolicy"], "Always");
    assert_eq!(c["resources"], values["resources"]);
    // Helm merges a map value into the chart's default (a key is removed only by setting it to null).
    let mut sc = values["securityContext"].clone();
    sc["privileged"] = json!(false);
    assert_eq!(c["securityContext"], sc);
    assert_eq!(c["ports"][0]["containerPort"], 9090);
    for (name, value) in [
        ("REKEY_CLUSTER_NAME", "everything"),
        ("REKEY_NAMESPACES", &format!("{a},{b}")),
        ("REKEY_LEASE_NAME", "everything-rekey"),
        ("REKEY_METRICS_ADDRESS", "0.0.0.0:9090"),
        ("REKEY_LOG_FORMAT", "text"),
        ("AWS_REGION", "eu-west-1"),
        ("REKEY_ALLOWED_ROLE_ARNS", "arn:aws:iam::*:role/rekey/*,arn:aws:iam::444455556666:role/x"),
        ("REKEY_MAX_CONCURRENT_ROTATIONS", "5"),
        ("REKEY_AWS_CALLS_PER_SECOND", "4"),
        ("REKEY_AWS_CALLS_PER_SECOND_TOTAL", "8"),
        ("REKEY_AWS_EVENTS_QUEUE_URL", "https://sqs.eu-west-1.amazonaws.com/111122223333/rekey-aws-events"),
        ("RUST_LOG", "debug"),
    ] {
        assert_eq!(env_value(c, name).as_deref(), Some(value), "{}: env {name}", helm.version);
    }
    // Every variable the chart sets is one `rekey run` reads (a typo would be ignored).
    for e in c["env"].as_array().context("env")? {
        let name = e["name"].as_str().context("env name")?;
        let known =
            help.contains(&format!("[env: {name}=")) || ["POD_NAME", "POD_NAMESPACE", "RUST_LOG"].contains(&name);
        assert!(known, "the chart sets {name}, which is not a setting of `rekey run`");
    }
    let sa = find(&objects, "ServiceAccount")?;
    assert_eq!(sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"], "arn:aws:iam::111122223333:role/rekey");
    assert_eq!(sa["metadata"]["annotations"]["team"], "platform");
    assert_eq!(find(&objects, "PodDisruptionBudget")?["spec"]["maxUnavailable"], 2);
    let np = find(&objects, "NetworkPolicy")?;
    assert_eq!(np["spec"]["ingress"][0]["ports"][0]["port"], 9090);
    assert_eq!(np["spec"]["ingress"][0]["from"], values["networkPolicy"]["metricsFrom"]);
    assert_eq!(find(&objects, "Service")?["spec"]["ports"][0]["port"], 9090);
    // One Role and RoleBinding per watched namespace, no cluster-wide rights.
    for ns in [&a, &b] {
        for kind in ["Role", "RoleBinding"] {
            let n = objects.iter().filter(|o| o["kind"] == kind && o["metadata"]["namespace"] == ns.as_str()).count();
            assert_eq!(n, 1, "{kind} in {ns}");
        }
    }
    assert!(!objects.iter().any(|o| o["kind"] == "ClusterRole" || o["kind"] == "ClusterRoleBinding"));
    // monitoring.labels on both (kube-prometheus-stack selects by `release`), each one's own too.
    for (kind, own, value) in [("ServiceMonitor", "scraped-by", "platform"), ("PrometheusRule", "team", "sre")] {
        let labels = &find(&objects, kind)?["metadata"]["labels"];
        assert_eq!(labels["release"], "kube-prometheus-stack", "{kind}'s monitoring.labels");
        assert_eq!(labels[own], value, "{kind}'s own labels");
    }
    let rules = &find(&objects, "PrometheusRule")?["spec"]["groups"][0]["rules"];
    for rule in rules.as_array().context("rules")? {
        let url = rule["annotations"]["runbook_url"].as_str().unwrap_or_default();
        let anchor = rule["alert"].as_str().unwrap_or_default().to_lowercase();
        assert_eq!(url, format!("https://wiki.example.com/rekey/runbooks#{anchor}"), "monitoring.runbookBaseUrl");
    }
    assert_eq!(find(&objects, "ServiceMonitor")?["spec"]["endpoints"][0]["interval"], "1m");
    assert_eq!(find(&objects, "ConfigMap")?["metadata"]["labels"]["grafana_dashboard"], "1");

    // With one replica: no PodDisruptionBudget, no spread; monitoring off renders none of it.
    let mut one = values.clone();
    one["replicas"] = json!(1);
    one["monitoring"] = json!({});
    one["networkPolicy"] = json!({"enabled": false});
    let objects_one = helm.template("everything", &rel_ns, &one).await?;
    for kind in ["PodDisruptionBudget", "ServiceMonitor", "PrometheusRule", "ConfigMap", "NetworkPolicy"] {
        assert!(!objects_one.iter().any(|o| o["kind"] == kind), "{kind} rendered with {one}");
    }
    assert!(find(&objects_one, "Deployment")?["spec"]["template"]["spec"]["topologySpreadConstraints"].is_null());

    // The apiserver validates and admits every object (server-side dry run), rendered with its own
    // API versions (helm install --dry-run=server). The Prometheus Operator's CRDs are not installed
    // on the test control plane.
    let mut no_monitoring = values.clone();
    no_monitoring["monitoring"] = json!({});
    let file = values_file(&no_monitoring)?;
    let out = helm
        .ok(&[
            "install",
            "everything",
            CHART,
            "--namespace",
            &rel_ns,
            "--values",
            &file,
            "--dry-run=server",
            "--output",
            "json",
        ])
        .await?;
    let release: Value = serde_json::from_str(&out).context("helm install --output json")?;
    let rendered = documents(release["manifest"].as_str().context("manifest")?)?;
    let pdb = find(&rendered, "PodDisruptionBudget")?;
    assert_eq!(pdb["apiVersion"], "policy/v1", "{}: the cluster's PodDisruptionBudget version", helm.version);
    for o in &rendered {
        apply_manifest(&env.kube, o, true).await.with_context(|| format!("{}: {}", helm.version, key(o)))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// Install, rotate, upgrade, uninstall
// ---------------------------------------------------------------------------------------------------

/// The chart's RBAC rules as installed are exactly the kustomize install's.
fn rules(v: &impl serde::Serialize) -> anyhow::Result<Value> {
    Ok(serde_json::to_value(v)?["rules"].clone())
}

/// The rules of the kustomize install's `kind` named rekey (not the leader-election Role).
fn shipped_rules(dir: &str, kind: &str) -> anyhow::Result<Value> {
    let objects = kustomize(dir)?;
    let o = objects.iter().find(|o| o["kind"] == kind && o["metadata"]["name"] == "rekey");
    Ok(o.with_context(|| format!("no {kind} rekey in deploy/{dir}"))?["rules"].clone())
}

/// The PodDisruptionBudget `ns`/`name`, if there is one.
async fn pdb(kube: &kube::Client, ns: &str, name: &str) -> anyhow::Result<Option<DynamicObject>> {
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("policy", "v1", "PodDisruptionBudget"),
        "poddisruptionbudgets",
    );
    Ok(Api::<DynamicObject>::namespaced_with(kube.clone(), ns, &ar).get_opt(name).await?)
}

struct Kept {
    uid: Option<String>,
    rotations: u32,
    key: Option<String>,
}

fn kept(o: &IamKeyRotation) -> Kept {
    Kept { uid: o.metadata.uid.clone(), rotations: o.status.as_ref().map_or(0, |s| s.rotations), key: active_key(o) }
}

async fn install_rotate_upgrade_uninstall(helm: &Helm) -> anyhow::Result<()> {
    let major = helm.major;
    let f = Fixture::new(&format!("helm{major}")).await?;
    let kube = f.env.kube.clone();
    let crds: Api<CustomResourceDefinition> = Api::all(kube.clone());
    // The shared control plane has the CRD already (other tests install it), so `helm install`
    // skips the chart's copy; it must neither replace it nor, on uninstall, delete it.
    let crd_uid = crds.get("iamkeyrotations.rekey.dev").await?.metadata.uid;
    // A fresh release namespace, made by Helm; the release's objects are named <release>-rekey.
    let rel_ns = rekey_testenv::env::unique(&format!("helm{major}-rel"));
    let release = rel_ns.as_str();
    let full = format!("{release}-rekey");
    let mut guard = ReleaseGuard { helm, release: release.to_owned(), armed: true };
    let t0 = std::time::Instant::now();
    helm.sh(&format!(
        "install {release} CHART --namespace {release} --create-namespace --set clusterName={CLUSTER} \
         --set image.repository=rekey-test --wait --timeout 3m"
    ))
    .await?;
    eprintln!("{}: helm install --wait took {:?}", helm.version, t0.elapsed());
    let deployments: Api<Deployment> = Api::namespaced(kube.clone(), release);
    deployment_ready(&deployments, &full, WAIT).await?;
    let cr = Api::<ClusterRole>::all(kube.clone()).get(&full).await?;
    assert_eq!(rules(&cr)?, shipped_rules("cluster-wide", "ClusterRole")?, "the ClusterRole's rules are deploy/'s");
    let le = Api::<Role>::namespaced(kube.clone(), release).get(&format!("{full}-leader-election")).await?;
    assert_eq!(serde_json::to_value(&le)?["rules"][1]["resourceNames"], json!([full]), "the Lease is the release's");

    // A full rotation by the operator binary, authenticated as the chart's ServiceAccount, leading
    // on the Lease the chart's Role allows (its Deployment's pod is simulated and runs nothing).
    let kubeconfig = service_account_kubeconfig_in(&f.env, release, &full).await?;
    let kubeconfig = kubeconfig.to_str().context("path")?;
    let op_env = [("KUBECONFIG", kubeconfig), ("REKEY_LEASE_NAMESPACE", release), ("REKEY_LEASE_NAME", full.as_str())];
    let op = Operator::start(&f.ns, &op_env).await?;
    Api::<Deployment>::namespaced(kube.clone(), &f.ns)
        .create(&PostParams::default(), &deployment("web", 2, "creds")?)
        .await?;
    f.create("app", json!({"userName": f.user, "secrets": [{"name": "creds"}], "retirement": {"deleteAfter": "1s"}}))
        .await?;
    wait_ikr(&f.ikrs, "app", "bootstrapped", |o| phase(o) == Phase::Idle && active_key(o).is_some()).await?;
    f.rotate("app", "1").await?;
    let o = wait_ikr(&f.ikrs, "app", "rotated as the chart's ServiceAccount", |o| {
        o.status.as_ref().is_some_and(|s| s.rotations == 1 && s.phase == Phase::Idle)
    })
    .await?;
    let before = kept(&o);
    assert_eq!(f.env.keys(&f.user).await?.into_keys().collect::<Vec<_>>(), vec![before.key.clone().context("key")?]);

    // helm upgrade: a standby replica (PodDisruptionBudget, spread) and namespaced mode (the
    // ClusterRole goes, a Role in the watched namespace comes). The resources and their status stay;
    // the running operator keeps rotating with the namespaced rights.
    helm.sh(&format!(
        "upgrade {release} CHART --namespace {release} --reuse-values --set replicas=2 --set mode=namespaced \
         --set watchNamespaces={{{}}} --wait --timeout 3m",
        f.ns
    ))
    .await?;
    let status: Value =
        serde_json::from_str(&helm.sh(&format!("status {release} --namespace {release} --output json")).await?)?;
    assert_eq!(
        (&status["version"], &status["info"]["status"]),
        (&json!(2), &json!("deployed")),
        "{}: revision 2",
        helm.version
    );
    let o = f.ikrs.get("app").await?;
    let after = kept(&o);
    assert_eq!(
        (&after.uid, after.rotations, &after.key),
        (&before.uid, before.rotations, &before.key),
        "upgrade keeps the resource and its status"
    );
    assert_eq!(phase(&o), Phase::Idle);
    let d = deployments.get(&full).await?;
    assert_eq!(d.spec.as_ref().and_then(|s| s.replicas), Some(2));
    let c = serde_json::to_value(&d)?["spec"]["template"]["spec"]["containers"][0].clone();
    assert_eq!(env_value(&c, "REKEY_NAMESPACES").as_deref(), Some(f.ns.as_str()));
    deployment_ready(&deployments, &full, WAIT).await?;
    assert!(pdb(&kube, release, &full).await?.is_some(), "replicas > 1: a PodDisruptionBudget");
    assert!(Api::<ClusterRole>::all(kube.clone()).get_opt(&full).await?.is_none(), "namespaced: no ClusterRole");
    let role = Api::<Role>::namespaced(kube.clone(), &f.ns).get(&full).await?;
    assert_eq!(rules(&role)?, shipped_rules("namespaced", "Role")?, "the Role's rules are deploy/namespaced's");
    assert_eq!(crds.get("iamkeyrotations.rekey.dev").await?.metadata.uid, crd_uid, "upgrade leaves the CRD");
    f.rotate("app", "2").await?;
    let o = wait_ikr(&f.ikrs, "app", "rotated again after the upgrade", |o| {
        o.status.as_ref().is_some_and(|s| s.rotations == 2 && s.phase == Phase::Idle)
    })
    .await?;
    let last = kept(&o);
    assert_eq!(last.uid, before.uid);

    // helm uninstall (the operator's pod goes with it): what the release created goes; the CRD
    // (crds/ is never deleted by Helm), every IamKeyRotation with its status and finalizer, the key
    // in IAM and in the Secret stay.
    drop(op);
    helm.ok(&["uninstall", release, "--namespace", release, "--wait", "--timeout", "3m"]).await?;
    guard.armed = false;
    eventually("the release's objects deleted", WAIT, || async {
        let left = [
            deployments.get_opt(&full).await?.is_some(),
            Api::<ServiceAccount>::namespaced(kube.clone(), release).get_opt(&full).await?.is_some(),
            Api::<Role>::namespaced(kube.clone(), &f.ns).get_opt(&full).await?.is_some(),
            pdb(&kube, release, &full).await?.is_some(),
        ];
        Ok(if left.iter().any(|x| *x) { Err(format!("left: {left:?}")) } else { Ok(()) })
    })
    .await?;
    assert_eq!(crds.get("iamkeyrotations.rekey.dev").await?.metadata.uid, crd_uid, "uninstall leaves the CRD");
    let o = f.ikrs.get("app").await?;
    let stays = kept(&o);
    assert_eq!(
        (&stays.uid, stays.rotations, &stays.key),
        (&last.uid, 2, &last.key),
        "the resource and its status stay"
    );
    assert!(!o.metadata.finalizers.unwrap_or_default().is_empty(), "its finalizer stays (deleting it waits for rekey)");
    let key = last.key.context("key")?;
    let keys = f.env.keys(&f.user).await?;
    assert_eq!(keys.into_iter().collect::<Vec<_>>(), vec![(key.clone(), "Active".to_owned())], "the key stays in IAM");
    assert_eq!(held_key(&f.secrets, "creds").await?.as_deref(), Some(key.as_str()), "and in the Secret");
    // Helm 3 lists failed and pending releases only with --all; Helm 4 lists every status by
    // default and has no --all.
    let listed = match major {
        3 => helm.ok(&["list", "--namespace", release, "--all", "--short"]).await?,
        _ => helm.ok(&["list", "--namespace", release, "--short"]).await?,
    };
    assert!(listed.trim().is_empty(), "{}: no release left: {listed}", helm.version);
    let storage =
        Api::<Secret>::namespaced(kube.clone(), release).list(&ListParams::default().labels("owner=helm")).await?;
    assert!(storage.items.is_empty(), "{}: the release's history is gone too", helm.version);
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// The tests: each under Helm 3.17.3 and Helm 4.1.4.
// ---------------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_chart_crd_is_the_committed_crd() -> anyhow::Result<()> {
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/iamkeyrotation.yaml"))?;
    let chart = std::fs::read_to_string(format!("{CHART}/crds/iamkeyrotation.yaml"))?;
    assert!(
        chart == committed,
        "deploy/chart/rekey/crds/iamkeyrotation.yaml differs from crds/iamkeyrotation.yaml: \
         cp crds/iamkeyrotation.yaml deploy/chart/rekey/crds/ and commit it"
    );
    let files: Vec<_> = std::fs::read_dir(format!("{CHART}/crds"))?.flatten().map(|e| e.file_name()).collect();
    assert_eq!(files.len(), 1, "the chart's crds/ holds the one CRD: {files:?}");
    let dashboard = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/monitoring/grafana-dashboard.json"))?;
    assert!(
        std::fs::read(format!("{CHART}/files/grafana-dashboard.json"))? == dashboard,
        "cp deploy/monitoring/grafana-dashboard.json deploy/chart/rekey/files/"
    );
    for major in [3, 4] {
        let helm = Helm::get(major).await?;
        let shown = documents(&helm.ok(&["show", "crds", CHART]).await?)?;
        assert_eq!(shown, documents(&committed)?, "{}: helm show crds", helm.version);
    }
    Ok(())
}

macro_rules! under_both {
    ($($name3:ident, $name4:ident => $body:ident;)*) => {$(
        #[tokio::test]
        async fn $name3() -> anyhow::Result<()> {
            $body(&Helm::get(3).await?).await
        }
        #[tokio::test]
        async fn $name4() -> anyhow::Result<()> {
            $body(&Helm::get(4).await?).await
        }
    )*};
}

under_both! {
    helm3_lint_strict_and_the_schema_rejects_bad_values, helm4_lint_strict_and_the_schema_rejects_bad_values => lint_and_schema;
    helm3_the_chart_renders_what_kustomize_installs, helm4_the_chart_renders_what_kustomize_installs => renders_what_kustomize_installs;
    helm3_every_option_renders_and_the_apiserver_accepts_it, helm4_every_option_renders_and_the_apiserver_accepts_it => every_option_renders_and_is_accepted;
    helm3_install_rotate_upgrade_uninstall, helm4_install_rotate_upgrade_uninstall => install_rotate_upgrade_uninstall;
}
