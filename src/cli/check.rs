//! `rekey check`: is rekey healthy in this cluster? The CRD (installed, established, the version
//! this binary speaks, the same schema), a leader holding a fresh Lease, and /metrics answering —
//! through the apiserver's service proxy by default, so that an SRE needs only kubectl's access.
//! TOUCHES THE CLUSTER (reads only).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::{CustomResourceExt as _, Resource as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::CliError;
use super::args::CheckArgs;
use super::connect::Connection;
use crate::api::IamKeyRotation;

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub what: &'static str,
    pub ok: bool,
    pub detail: String,
}

fn finding(what: &'static str, ok: bool, detail: impl Into<String>) -> Finding {
    Finding { what, ok, detail: detail.into() }
}

/// The installed CRD against the one this binary generates (pure).
pub fn crd_finding(installed: Option<&CustomResourceDefinition>) -> Finding {
    let ours = IamKeyRotation::crd();
    let name = ours.metadata.name.clone().unwrap_or_default();
    let Some(crd) = installed else {
        return finding("CRD", false, format!("{name} is not installed: kubectl apply -f crds/"));
    };
    let established = crd
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Established" && c.status == "True"));
    let version = IamKeyRotation::version(&());
    let served = crd.spec.versions.iter().find(|v| v.name == version && v.served);
    let storage = crd.spec.versions.iter().find(|v| v.storage).map(|v| v.name.as_str()).unwrap_or("-");
    let same_schema = served.is_some_and(|v| ours.spec.versions.iter().any(|o| o.schema == v.schema));
    let detail = format!(
        "{name} {}; storage version {storage}; {version} {}; schema {}",
        if established { "established" } else { "NOT established" },
        if served.is_some() { "served" } else { "NOT served (this rekey speaks it)" },
        if same_schema {
            "matches this rekey's"
        } else {
            "differs from this rekey's: apply its crds/ (the apiserver drops status fields an older schema lacks, write-ahead records included)"
        },
    );
    finding("CRD", established && served.is_some() && same_schema, detail)
}

/// Whether a leader renewed the Lease within its duration (pure).
pub fn lease_finding(lease: Option<&Lease>, where_: &str, now: Timestamp) -> Finding {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return finding("Leader", false, format!("no Lease {where_}: is rekey running, with leader election?"));
    };
    let (holder, renewed, secs) =
        (spec.holder_identity.as_deref(), spec.renew_time.as_ref(), spec.lease_duration_seconds.unwrap_or(0));
    match (holder, renewed) {
        (Some(h), Some(t)) if !h.is_empty() => {
            let ago = now.duration_since(t.0).as_secs();
            let fresh = ago <= i64::from(secs);
            let state = if fresh { "valid" } else { "EXPIRED: the leader is gone" };
            finding(
                "Leader",
                fresh,
                format!("Lease {where_} held by {h}, renewed {ago}s ago ({state}; duration {secs}s)"),
            )
        }
        _ => finding("Leader", false, format!("Lease {where_} has no holder: no replica leads")),
    }
}

/// What /metrics answered (pure): rekey's series, or why not.
pub fn metrics_finding(answer: Result<String, String>, via: &str) -> Finding {
    match answer {
        Ok(body) if body.contains("rekey_") => {
            let series = body.lines().filter(|l| l.starts_with("rekey_")).count();
            finding("Metrics", true, format!("{via} answers: {series} rekey series"))
        }
        Ok(_) => finding("Metrics", false, format!("{via} answers, but without rekey_ series")),
        Err(e) => finding("Metrics", false, format!("{via}: {e}")),
    }
}

/// The apiserver's proxy path to a Service's /metrics (`NAME` or `NAME:PORT`).
pub fn proxy_path(namespace: &str, service: &str) -> String {
    format!("/api/v1/namespaces/{namespace}/services/{service}/proxy/metrics")
}

/// A plain-HTTP GET (a port-forward or an address inside the cluster network); TLS is for the
/// service proxy route.
async fn get_plain(url: &str) -> Result<String, String> {
    let rest = url.strip_prefix("http://").ok_or("only http:// URLs (use the service proxy for TLS)")?;
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/metrics".into()));
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(host).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| "no answer within 5s".to_owned())?
        .map_err(|e| e.to_string())?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or("not an HTTP answer")?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) == Some("200") { Ok(body.to_owned()) } else { Err(status.to_owned()) }
}

async fn metrics(conn: &Connection, args: &CheckArgs) -> Finding {
    if let Some(url) = &args.metrics_url {
        return metrics_finding(get_plain(url).await, url);
    }
    let path = proxy_path(&args.operator_namespace, &args.metrics_service);
    let answer = match http::Request::get(&path).body(Vec::new()) {
        Ok(req) => conn.client.request_text(req).await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    metrics_finding(answer, &format!("service {}/{}", args.operator_namespace, args.metrics_service))
}

/// Prints one line per check; Err(Unhealthy) if any failed.
pub async fn run(conn: &Connection, args: &CheckArgs) -> Result<(), CliError> {
    let crds: Api<CustomResourceDefinition> = Api::all(conn.client.clone());
    let crd = crds.get_opt(IamKeyRotation::crd_name()).await?;
    let leases: Api<Lease> = Api::namespaced(conn.client.clone(), &args.operator_namespace);
    let lease = leases.get_opt(&args.lease_name).await?;
    let where_ = format!("{}/{}", args.operator_namespace, args.lease_name);
    let mut findings = vec![crd_finding(crd.as_ref()), lease_finding(lease.as_ref(), &where_, Timestamp::now())];
    if !args.skip_metrics {
        findings.push(metrics(conn, args).await);
    }
    for f in &findings {
        println!("{:<8} {:<5} {}", f.what, if f.ok { "ok" } else { "FAIL" }, f.detail);
    }
    match findings.iter().filter(|f| !f.ok).count() {
        0 => Ok(()),
        n => Err(CliError::Unhealthy(format!("{n} of {} checks failed", findings.len()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, renewed: &str) -> Lease {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "rekey"},
            "spec": {"holderIdentity": holder, "renewTime": renewed, "leaseDurationSeconds": 15}}))
        .unwrap()
    }

    #[test]
    fn a_lease_is_healthy_while_its_holder_renews_it_within_its_duration() {
        let now: Timestamp = "2026-01-01T00:01:00Z".parse().unwrap();
        let f = lease_finding(Some(&lease(Some("rekey-1"), "2026-01-01T00:00:50.000000Z")), "ns/rekey", now);
        assert!(f.ok && f.detail.contains("held by rekey-1, renewed 10s ago"), "{f:?}");
        assert!(!lease_finding(Some(&lease(Some("rekey-1"), "2026-01-01T00:00:00.000000Z")), "ns/rekey", now).ok);
        assert!(!lease_finding(Some(&lease(None, "2026-01-01T00:00:59.000000Z")), "ns/rekey", now).ok);
        assert!(!lease_finding(None, "ns/rekey", now).ok);
    }

    #[test]
    fn the_crd_this_binary_generates_is_healthy_once_established() {
        let mut crd = IamKeyRotation::crd();
        assert!(!crd_finding(Some(&crd)).ok, "not established yet");
        crd.status =
            serde_json::from_value(serde_json::json!({"conditions": [{"type": "Established", "status": "True"}]}))
                .unwrap();
        let f = crd_finding(Some(&crd));
        assert!(f.ok && f.detail.contains("storage version v1alpha1") && f.detail.contains("schema matches"), "{f:?}");
        assert!(!crd_finding(None).ok);
        // An older CRD (here: without the status schema) is a failure, not a note.
        let mut older = crd.clone();
        if let Some(s) = older.spec.versions[0].schema.as_mut().and_then(|s| s.open_api_v3_schema.as_mut()) {
            s.properties.as_mut().unwrap().remove("status");
        }
        let f = crd_finding(Some(&older));
        assert!(!f.ok && f.detail.contains("differs"), "{f:?}");
    }

    #[test]
    fn metrics_count_only_when_they_are_rekeys() {
        assert!(metrics_finding(Ok("# HELP x\nrekey_managed_resources 1\n".into()), "u").ok);
        assert!(!metrics_finding(Ok("go_goroutines 1\n".into()), "u").ok);
        assert!(!metrics_finding(Err("connection refused".into()), "u").ok);
        assert_eq!(
            proxy_path("rekey-system", "rekey-metrics:metrics"),
            "/api/v1/namespaces/rekey-system/services/rekey-metrics:metrics/proxy/metrics"
        );
    }
}
