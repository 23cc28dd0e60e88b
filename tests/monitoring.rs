//! The shipped monitoring (deploy/monitoring/) on a real Prometheus: Debian's prometheus and
//! promtool 2.42, provisioned by `scripts/testenv provision` and exported as REKEY_PROMETHEUS and
//! REKEY_PROMTOOL. promtool checks the rules and runs the unit tests of every alert
//! (deploy/monitoring/tests/); every alert links a runbook that docs/operations.md has; and a
//! Prometheus scraping a running operator, as the ServiceMonitor does, fires RekeyRotationStalled
//! for a rotation that really stalled, naming the resource's namespace.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use rekey_testenv::env::{eventually, http_get, unique};
use serde_json::{Value, json};
use support::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A provisioned binary. Never skipped: a missing one fails the test with what to run.
fn tool(var: &str) -> anyhow::Result<PathBuf> {
    let how = "run scripts/testenv provision, then eval \"$(scripts/testenv env)\"";
    let bin = PathBuf::from(std::env::var(var).with_context(|| format!("{var} is not set: {how}"))?);
    anyhow::ensure!(bin.is_file(), "{var}={} does not exist: {how}", bin.display());
    Ok(bin)
}

/// A fresh directory under the test target's temporary directory.
fn scratch(prefix: &str) -> anyhow::Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique(prefix));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn yaml_file(path: &str) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(format!("{ROOT}/{path}")).with_context(|| path.to_owned())?;
    Ok(serde_saphyr::from_str(&text)?)
}

/// The PrometheusRule's spec: what Prometheus itself reads as a rule file (`groups:`).
fn rule_groups() -> anyhow::Result<Value> {
    Ok(yaml_file("deploy/monitoring/prometheusrule.yaml")?["spec"].clone())
}

fn alerts(groups: &Value) -> Vec<&Value> {
    let groups = groups["groups"].as_array().map(Vec::as_slice).unwrap_or_default();
    groups.iter().flat_map(|g| g["rules"].as_array().into_iter().flatten()).filter(|r| r["alert"].is_string()).collect()
}

fn alert_names(groups: &Value) -> BTreeSet<String> {
    alerts(groups).iter().filter_map(|r| r["alert"].as_str()).map(str::to_owned).collect()
}

async fn run(bin: &Path, args: &[&str], dir: &Path) -> anyhow::Result<String> {
    let out = tokio::process::Command::new(bin).args(args).current_dir(dir).output().await?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    anyhow::ensure!(out.status.success(), "{} {} failed:\n{text}", bin.display(), args.join(" "));
    Ok(text)
}

#[tokio::test]
async fn promtool_checks_the_rules_and_unit_tests_every_alert() -> anyhow::Result<()> {
    let promtool = tool("REKEY_PROMTOOL")?;
    let groups = rule_groups()?;
    // The unit tests name their rule file rekey-rules.yaml, written here beside a copy of them.
    let dir = scratch("promtool")?;
    std::fs::write(dir.join("rekey-rules.yaml"), serde_saphyr::to_string(&groups)?)?;
    std::fs::copy(format!("{ROOT}/deploy/monitoring/tests/rules.test.yaml"), dir.join("rules.test.yaml"))?;
    let out = run(&promtool, &["check", "rules", "rekey-rules.yaml"], &dir).await?;
    assert!(out.contains("SUCCESS"), "{out}");
    let out = run(&promtool, &["test", "rules", "rules.test.yaml"], &dir).await?;
    assert!(out.contains("SUCCESS"), "{out}");

    // Every alert is tested firing at least once.
    let tests = yaml_file("deploy/monitoring/tests/rules.test.yaml")?;
    let fired: BTreeSet<String> = tests["tests"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|t| t["alert_rule_test"].as_array().into_iter().flatten())
        .filter(|c| c["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()))
        .filter_map(|c| c["alertname"].as_str().map(str::to_owned))
        .collect();
    let names = alert_names(&groups);
    let untested: Vec<_> = names.difference(&fired).collect();
    assert!(untested.is_empty(), "alerts no promtool test sees firing: {untested:?}");
    assert!(names.len() >= 9, "{names:?}");
    Ok(())
}

/// GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces as dashes.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

#[test]
fn every_alert_links_a_runbook_that_docs_operations_md_has() -> anyhow::Result<()> {
    let docs = std::fs::read_to_string(format!("{ROOT}/docs/operations.md"))?;
    let runbooks = docs.split_once("\n## Runbooks\n").context("docs/operations.md has a Runbooks section")?.1;
    let runbooks = runbooks.split("\n## ").next().unwrap_or_default();
    let anchors: BTreeSet<String> = runbooks.lines().filter_map(|l| l.strip_prefix("### ")).map(anchor).collect();
    let groups = rule_groups()?;
    for rule in alerts(&groups) {
        let name = rule["alert"].as_str().unwrap_or_default();
        let url = rule["annotations"]["runbook_url"].as_str().with_context(|| format!("{name}: no runbook_url"))?;
        let (base, fragment) = url.split_once('#').with_context(|| format!("{name}: {url} has no anchor"))?;
        assert!(base.ends_with("/docs/operations.md"), "{name}: {url} points into docs/operations.md");
        assert_eq!(fragment, name.to_lowercase(), "{name}: the anchor is the alert's name");
        assert!(anchors.contains(fragment), "{name}: docs/operations.md's Runbooks have no heading #{fragment}");
        for key in ["summary", "description"] {
            assert!(rule["annotations"][key].is_string(), "{name}: no {key}");
        }
        let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
        assert!(["warning", "critical"].contains(&severity), "{name}: severity {severity:?}");
    }
    Ok(())
}

/// The kustomize way to the label kube-prometheus-stack selects by; the ServiceMonitor keeps the
/// resource's `namespace` label (honorLabels).
#[test]
fn the_kube_prometheus_stack_overlay_labels_what_its_prometheus_selects() -> anyhow::Result<()> {
    let objects = kustomize("../examples/kube-prometheus-stack")?;
    for kind in ["ServiceMonitor", "PrometheusRule"] {
        let o = objects.iter().find(|o| o["kind"] == kind).with_context(|| format!("no {kind}"))?;
        assert_eq!(o["metadata"]["labels"]["release"], "kube-prometheus-stack", "{kind}");
    }
    let sm = objects.iter().find(|o| o["kind"] == "ServiceMonitor").context("ServiceMonitor")?;
    assert_eq!(sm["spec"]["endpoints"][0]["honorLabels"], true);
    Ok(())
}

/// A Prometheus server of this test's, on a free loopback port; killed when dropped.
struct Prometheus {
    _child: tokio::process::Child,
    url: String,
    log: PathBuf,
}

impl Prometheus {
    /// Scrapes `target` every second as the ServiceMonitor does (the target's namespace label,
    /// rekey-system, and honored labels) and evaluates `groups` every second.
    async fn start(target: &str, groups: &Value) -> anyhow::Result<Self> {
        let bin = tool("REKEY_PROMETHEUS")?;
        let dir = scratch("prometheus")?;
        std::fs::write(dir.join("rules.yaml"), serde_saphyr::to_string(groups)?)?;
        let config = json!({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["rules.yaml"],
            "scrape_configs": [{
                "job_name": "rekey",
                "honor_labels": true,
                "static_configs": [{"targets": [target], "labels": {"namespace": "rekey-system"}}],
            }],
        });
        std::fs::write(dir.join("prometheus.yml"), serde_saphyr::to_string(&config)?)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let log = dir.join("prometheus.log");
        let file = std::fs::File::create(&log)?;
        let child = tokio::process::Command::new(&bin)
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .current_dir(&dir)
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        Ok(Self { _child: child, url: format!("http://127.0.0.1:{port}"), log })
    }

    /// `data` of an API answer whose status is success.
    async fn api(&self, path: &str) -> anyhow::Result<Value> {
        let body = http_get(&self.url, path).await?;
        let v: Value = serde_json::from_str(&body).with_context(|| format!("{path}: {body}"))?;
        anyhow::ensure!(v["status"] == "success", "{path}: {body}");
        Ok(v["data"].clone())
    }

    async fn query(&self, promql: &str) -> anyhow::Result<Value> {
        let q = form_urlencoded::Serializer::new(String::new()).append_pair("query", promql).finish();
        self.api(&format!("/api/v1/query?{q}")).await
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

#[tokio::test]
async fn a_real_prometheus_fires_the_stalled_alert_for_a_stalled_rotation() -> anyhow::Result<()> {
    let f = Fixture::new("prometheus").await?;
    // An immutable Secret can never receive a key: the bootstrap stalls (SecretImmutable).
    let creds: Secret =
        serde_json::from_value(json!({"metadata": {"name": "creds"}, "immutable": true, "stringData": {"X": "y"}}))?;
    f.secrets.create(&PostParams::default(), &creds).await?;
    f.create("app", json!({"userName": f.user, "secrets": [{"name": "creds"}]})).await?;
    let op = f.operator().await?;

    // The shipped rules, but RekeyRotationStalled's `for:` shortened from 10m to 2s so that the
    // test waits seconds, not minutes; the expression, labels and annotations are as shipped.
    let mut groups = rule_groups()?;
    for group in groups["groups"].as_array_mut().into_iter().flatten() {
        for rule in group["rules"].as_array_mut().into_iter().flatten() {
            if rule["alert"] == "RekeyRotationStalled" {
                rule["for"] = json!("2s");
            }
        }
    }
    let prometheus = Prometheus::start(op.http.trim_start_matches("http://"), &groups).await?;
    wait_ikr(&f.ikrs, "app", "Stalled/SecretImmutable", |o| is_true(o, "Stalled", "SecretImmutable")).await?;

    let alert = eventually("Prometheus fires RekeyRotationStalled for the resource", WAIT, || async {
        let data = match prometheus.api("/api/v1/alerts").await {
            Ok(d) => d,
            Err(e) => return Ok(Err(format!("{e:#}\n{}", prometheus.output()))),
        };
        let alerts = data["alerts"].as_array().cloned().unwrap_or_default();
        let ours = alerts.iter().find(|a| {
            a["labels"]["alertname"] == "RekeyRotationStalled" && a["labels"]["name"] == "app" && a["state"] == "firing"
        });
        Ok(ours.cloned().ok_or_else(|| format!("alerts: {alerts:?}")))
    })
    .await?;
    // The resource's own namespace, not the scrape target's (honor_labels, as the ServiceMonitor).
    assert_eq!(alert["labels"]["namespace"], f.ns.as_str(), "{alert}");
    assert_eq!(alert["labels"]["severity"], "critical", "{alert}");
    let url = alert["annotations"]["runbook_url"].as_str().unwrap_or_default();
    assert!(url.ends_with("/docs/operations.md#rekeyrotationstalled"), "{alert}");
    let summary = alert["annotations"]["summary"].as_str().unwrap_or_default();
    assert!(summary.contains(&format!("{}/app", f.ns)), "{alert}");

    // Series without a namespace of their own get the target's: this replica leads, in rekey-system.
    let leader = prometheus.query("rekey_leader").await?;
    let leader = &leader["result"][0];
    assert_eq!(leader["metric"]["namespace"], "rekey-system", "{leader}");
    assert_eq!(leader["value"][1], "1", "{leader}");
    dashboard_queries_are_valid_promql(&prometheus).await
}

/// Every query of the Grafana dashboard is accepted by Prometheus (with every cluster and namespace).
async fn dashboard_queries_are_valid_promql(prometheus: &Prometheus) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(format!("{ROOT}/deploy/monitoring/grafana-dashboard.json"))?;
    let dashboard: Value = serde_json::from_str(&text)?;
    let panels = dashboard["panels"].as_array().context("panels")?;
    let mut n = 0;
    for target in panels.iter().flat_map(|p| p["targets"].as_array().into_iter().flatten()) {
        let expr = target["expr"].as_str().context("expr")?;
        let expr = expr.replace("$cluster", ".*").replace("$namespace", ".*");
        prometheus.query(&expr).await.with_context(|| format!("the dashboard's query {expr}"))?;
        n += 1;
    }
    assert!(n >= 15, "{n} queries");
    Ok(())
}
