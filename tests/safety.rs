//! Safety rules met where users run into them: a refused CreateAccessKey, a person's key beside
//! rekey's, partner keys and claims at adoption, the one-owner rule, immutable Secrets and edits of
//! spec.userName.
//!
//! CreateAccessKey is refused by IAM itself (AccessDenied, a 4xx answer), not by the shared fault
//! proxy: the resource rotates through a role (spec.aws.roleArn) whose policy leaves that one action
//! out. The refusal is then this test's alone, so the tests of this binary (and anyone else's using
//! the environment) run beside it unaffected; the proxy can only throttle or fail every operator's
//! calls of an action at once.
//!
//! moto words the refusal unlike IAM (`<ErrorResponse><Errors><Error>`, where IAM has no `Errors`),
//! so the SDK reads no error code from it: rekey sees `HTTP403` and reports the category IamError,
//! where against IAM it reports IamAccessDenied. The tests accept either.

mod support;

use std::collections::BTreeMap;

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use rekey::api::{IamKeyRotation, Phase};
use rekey_testenv::creds::KeyPair;
use rekey_testenv::env::{eventually, unique};
use serde_json::json;
use support::*;

/// The operator may assume the roles under /rekey/ (the roles of these tests).
const ALLOWED_ROLES: (&str, &str) = ("REKEY_ALLOWED_ROLE_ARNS", "arn:aws:iam::*:role/rekey/*");

/// A role under /rekey/ that trusts the operator with the external id of the Fixture's namespace,
/// allowed every IAM action of a rotation, CreateAccessKey only when `set_create` says so.
struct Role {
    name: String,
    arn: String,
}

impl Role {
    async fn refusing_create(f: &Fixture) -> anyhow::Result<Self> {
        let operator = std::env::var("REKEY_TEST_OPERATOR_USER").context("REKEY_TEST_OPERATOR_USER")?;
        let trust = json!({"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Action": "sts:AssumeRole",
            "Principal": {"AWS": format!("arn:aws:iam::{}:user/{operator}", f.env.account_id)},
            "Condition": {"StringEquals": {"sts:ExternalId": format!("{CLUSTER}/{}", f.ns)}}}]});
        let name = unique("refuse");
        let out = f
            .env
            .iam
            .create_role()
            .role_name(&name)
            .path("/rekey/")
            .assume_role_policy_document(trust.to_string())
            .send()
            .await?;
        let role = Self { arn: out.role().context("role")?.arn().to_owned(), name };
        role.set_create(f, false).await?;
        Ok(role)
    }

    /// Grants or withdraws iam:CreateAccessKey; IAM evaluates the policy on every call.
    async fn set_create(&self, f: &Fixture, allowed: bool) -> anyhow::Result<()> {
        let mut actions = vec![
            "iam:UpdateAccessKey",
            "iam:DeleteAccessKey",
            "iam:ListAccessKeys",
            "iam:GetUser",
            "iam:ListUserTags",
            "iam:TagUser",
            "iam:UntagUser",
            "iam:GetAccessKeyLastUsed",
        ];
        if allowed {
            actions.push("iam:CreateAccessKey");
        }
        let policy =
            json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]});
        let put = f.env.iam.put_role_policy().role_name(&self.name).policy_name("keys");
        put.policy_document(policy.to_string()).send().await?;
        Ok(())
    }
}

/// A user with key A in Secret `creds`, adopted by resource `app` that rotates through a role
/// refusing CreateAccessKey; the operator running.
async fn refused_setup(prefix: &str, extra: serde_json::Value) -> anyhow::Result<(Fixture, Role, KeyPair, Operator)> {
    let f = Fixture::new(prefix).await?;
    let role = Role::refusing_create(&f).await?;
    let key = f.env.create_key(&f.user).await?;
    f.secrets.create(&PostParams::default(), &key_secret("creds", &key)?).await?;
    let mut spec = json!({"userName": f.user, "secrets": [{"name": "creds"}], "aws": {"roleArn": role.arn}});
    for (k, v) in extra.as_object().context("object")? {
        spec[k] = v.clone();
    }
    f.create("app", spec).await?;
    let op = Operator::start(&f.ns, &[ALLOWED_ROLES]).await?;
    wait_ikr(&f.ikrs, "app", "adopted", |o| is_true(o, "Ready", "KeyInPlace")).await?;
    Ok((f, role, key, op))
}

fn failed_attempts(o: &IamKeyRotation) -> u32 {
    o.status.as_ref().map_or(0, |s| s.failed_attempts)
}

/// At least `n` attempts failed, and Degraded says IAM refused (see the module's note on moto).
fn refused(o: &IamKeyRotation, n: u32) -> bool {
    let reason = condition(o, "Degraded").filter(|c| c.0 == "True").map(|c| c.1);
    failed_attempts(o) >= n && reason.is_some_and(|r| r == "IamAccessDenied" || r == "IamError")
}

/// The write-ahead marker as (startedAt, inFlight), and the failure count.
fn marker(o: &IamKeyRotation) -> (Option<(String, bool)>, u32) {
    let p = o.status.as_ref().and_then(|s| s.pending.as_ref()).map(|p| (p.started_at.0.to_string(), p.in_flight));
    (p, failed_attempts(o))
}

fn active(keys: &[&KeyPair]) -> BTreeMap<String, String> {
    keys.iter().map(|k| (k.access_key_id.clone(), "Active".to_owned())).collect()
}

async fn event_reasons(f: &Fixture) -> anyhow::Result<Vec<String>> {
    let list = Api::<k8s_openapi::api::events::v1::Event>::namespaced(f.env.kube.clone(), &f.ns)
        .list(&Default::default())
        .await?;
    Ok(list.items.into_iter().filter_map(|e| e.reason).collect())
}

#[tokio::test]
async fn a_key_a_person_makes_while_create_access_key_is_refused_is_never_taken_for_an_orphan() -> anyhow::Result<()> {
    let (f, role, key, _op) = refused_setup("refused", json!({})).await?;
    f.rotate("app", "1").await?;
    let o = wait_ikr(&f.ikrs, "app", "CreateAccessKey refused", |o| refused(o, 1)).await?;
    assert_eq!(phase(&o), Phase::Creating);
    let before = marker(&o);
    assert_eq!(before.0.as_ref().map(|m| m.1), Some(false), "IAM answered: the marker is lowered");
    // A person makes a key for the user while rekey waits out its backoff (10 s).
    let person = f.env.create_key(&f.user).await?;
    assert_eq!(marker(&f.ikrs.get("app").await?), before, "the key was made while no CreateAccessKey was in flight");
    role.set_create(&f, true).await?;
    // The next attempt raises the marker again, listing the person's key, and finds no free slot.
    let o = wait_ikr(&f.ikrs, "app", "KeyQuotaExhausted", |o| is_true(o, "Degraded", "KeyQuotaExhausted")).await?;
    assert_eq!(phase(&o), Phase::Idle);
    assert!(o.status.as_ref().is_some_and(|s| s.pending.is_none()), "{:?}", o.status);
    assert_eq!(f.env.keys(&f.user).await?, active(&[&key, &person]), "the person's key is left alone");
    let reasons = event_reasons(&f).await?;
    assert!(!reasons.iter().any(|r| r == "OrphanDeleted"), "{reasons:?}");
    Ok(())
}

#[tokio::test]
async fn a_refused_rotation_is_degraded_naming_the_step_while_the_old_key_stays_ready() -> anyhow::Result<()> {
    let (f, role, key, _op) = refused_setup("refusal", json!({"retirement": {"deleteAfter": "2s"}})).await?;
    f.rotate("app", "1").await?;
    for attempt in 1..=2 {
        // The backoff after each failure keeps what the failure said.
        let o = wait_ikr(&f.ikrs, "app", &format!("attempt {attempt} refused"), |o| refused(o, attempt)).await?;
        let m = message(&o, "Degraded").unwrap_or_default();
        let step = format!("Create failed (attempt {attempt}, retried with backoff): IAM CreateAccessKey failed");
        assert!(m.contains(&step) && (m.contains("AccessDenied") || m.contains("HTTP403")), "{m}");
        assert!(is_true(&o, "Ready", "KeyInPlace"), "the old key still works: {:?}", condition(&o, "Ready"));
        assert_eq!(condition(&o, "Stalled").map(|c| c.0).as_deref(), Some("False"));
        assert_eq!(condition(&o, "Rotating"), Some(("True".into(), "Creating".into())));
        assert_eq!(f.env.keys(&f.user).await?, active(&[&key]), "no key was created");
    }
    role.set_create(&f, true).await?;
    let o = wait_ikr(&f.ikrs, "app", "rotation done once IAM allows it", |o| {
        o.status.as_ref().is_some_and(|s| s.rotations == 1 && s.phase == Phase::Idle)
    })
    .await?;
    assert_eq!(condition(&o, "Degraded").map(|c| c.0).as_deref(), Some("False"), "{:?}", message(&o, "Degraded"));
    let new = active_key(&o).context("new key")?;
    assert_ne!(new, key.access_key_id);
    assert_eq!(f.env.keys(&f.user).await?.into_keys().collect::<Vec<_>>(), vec![new]);
    Ok(())
}

/// The `rekey.dev/access-key-id` stamp on the Deployment's pod template.
async fn stamp(deploys: &Api<Deployment>, name: &str) -> anyhow::Result<Option<String>> {
    let d = deploys.get(name).await?;
    let t = d.spec.and_then(|s| s.template.metadata).and_then(|m| m.annotations);
    Ok(t.and_then(|a| a.get("rekey.dev/access-key-id").cloned()))
}

#[tokio::test]
async fn adopting_with_a_claimed_partner_rolls_the_workloads_onto_the_adopted_key_before_retiring_it()
-> anyhow::Result<()> {
    let f = Fixture::new("partner").await?;
    let (a, b) = (f.env.create_key(&f.user).await?, f.env.create_key(&f.user).await?);
    // B is this resource's (a rotation of an earlier life wrote A and lost its status), and the
    // pods still run on B: they started before A was written.
    f.set_claim(&b.access_key_id, &f.owner("app")).await?;
    f.secrets.create(&PostParams::default(), &key_secret("creds", &b)?).await?;
    let deploys: Api<Deployment> = Api::namespaced(f.env.kube.clone(), &f.ns);
    deploys.create(&PostParams::default(), &deployment("web", 2, "creds")?).await?;
    deployment_ready(&deploys, "web", WAIT).await?;
    let to_a =
        json!({"stringData": {"AWS_ACCESS_KEY_ID": a.access_key_id, "AWS_SECRET_ACCESS_KEY": a.secret_access_key}});
    f.secrets.patch("creds", &PatchParams::default(), &Patch::Merge(&to_a)).await?;
    let watch = KeyBreakWatch::start(&f.env, &f.ns);
    f.create("app", json!({"userName": f.user, "secrets": [{"name": "creds"}], "retirement": {"deleteAfter": "3s"}}))
        .await?;
    let _op = f.operator().await?;
    let early = std::cell::RefCell::new(None);
    eventually("B retired", WAIT, || async {
        // Keys first: a stamp missing after B was seen retired was missing when B was retired.
        let b_state = f.env.keys(&f.user).await?.get(&b.access_key_id).cloned();
        let stamped = stamp(&deploys, "web").await?;
        if b_state.as_deref() == Some("Active") {
            return Ok(Err(format!("B Active, stamp {stamped:?}")));
        }
        if stamped.as_deref() != Some(a.access_key_id.as_str()) {
            early.replace(Some(format!("B {b_state:?} while the Deployment's stamp was {stamped:?}")));
        }
        Ok(Ok(()))
    })
    .await?;
    assert_eq!(early.take(), None, "B was retired before the Deployment was stamped with A");
    let o = wait_ikr(&f.ikrs, "app", "partner deleted", |o| {
        phase(o) == Phase::Idle && o.status.as_ref().is_some_and(|s| s.retiring_key.is_none())
    })
    .await?;
    let broken = watch.stop();
    assert!(broken.is_empty(), "pods broke on their key: {broken:?}");
    assert_eq!(active_key(&o).as_deref(), Some(a.access_key_id.as_str()));
    assert_eq!(f.env.keys(&f.user).await?, active(&[&a]), "B deleted after its soak");
    assert_eq!(f.claim(&a.access_key_id).await?, Some(format!("rekey:{}", f.owner("app"))), "A is claimed");
    let pods = Api::<Pod>::namespaced(f.env.kube.clone(), &f.ns).list(&ListParams::default().labels("app=web")).await?;
    let on_a = |p: &Pod| p.metadata.annotations.as_ref().and_then(|a| a.get("rekey.dev/access-key-id")).cloned();
    assert!(pods.items.iter().all(|p| on_a(p).as_ref() == Some(&a.access_key_id)), "every pod restarted onto A");
    Ok(())
}

#[tokio::test]
async fn an_older_resource_the_user_does_not_consent_to_holds_nothing() -> anyhow::Result<()> {
    let f = Fixture::new("consent-a").await?;
    // Namespace B names the same user first, but the user consents only to the Fixture's namespace.
    let ns_b = f.env.namespace("consent-b").await?;
    let api_b: Api<IamKeyRotation> = Api::namespaced(f.env.kube.clone(), &ns_b);
    api_b
        .create(&PostParams::default(), &ikr("old", json!({"userName": f.user, "secrets": [{"name": "creds"}]}))?)
        .await?;
    // One operator watching both namespaces sees both resources.
    let _op = Operator::start_watching(&f.ns, &[&f.ns, &ns_b], &[]).await?;
    wait_ikr(&api_b, "old", "old Forbidden", |o| is_true(o, "Stalled", "Forbidden")).await?;
    f.create("app", json!({"userName": f.user, "secrets": [{"name": "creds"}]})).await?;
    let o = wait_ikr(&f.ikrs, "app", "app bootstrapped", |o| is_true(o, "Ready", "KeyInPlace")).await?;
    assert_ne!(condition(&o, "Degraded").map(|c| c.1).as_deref(), Some("Conflict"));
    let key = active_key(&o).context("key")?;
    assert_eq!(f.env.keys(&f.user).await?.into_keys().collect::<Vec<_>>(), vec![key]);
    let old = api_b.get("old").await?;
    assert!(is_true(&old, "Stalled", "Forbidden") && active_key(&old).is_none(), "{:?}", old.status);
    Ok(())
}

#[tokio::test]
async fn an_older_resource_with_an_invalid_spec_holds_nothing() -> anyhow::Result<()> {
    let f = Fixture::new("invalid-owner").await?;
    // Older by its creation time, and by its name too when both fall in the same second (the
    // one-owner rule's tie-break), so only its invalid spec can let "app" rotate the user.
    // (A time zone CEL cannot check: the apiserver admits it, validate refuses it.)
    let broken = json!({"userName": f.user, "secrets": [{"name": "other"}],
        "schedule": {"windows": [{"start": "02:00", "end": "05:00", "timeZone": "Mars/Olympus"}]}});
    f.create("a-broken", broken).await?;
    let _op = f.operator().await?;
    wait_ikr(&f.ikrs, "a-broken", "a-broken InvalidSpec", |o| is_true(o, "Stalled", "InvalidSpec")).await?;
    f.create("app", json!({"userName": f.user, "secrets": [{"name": "creds"}]})).await?;
    let o = wait_ikr(&f.ikrs, "app", "app bootstrapped", |o| is_true(o, "Ready", "KeyInPlace")).await?;
    assert_ne!(condition(&o, "Degraded").map(|c| c.1).as_deref(), Some("Conflict"));
    let key = active_key(&o).context("key")?;
    assert_eq!(f.env.keys(&f.user).await?.into_keys().collect::<Vec<_>>(), vec![key]);
    Ok(())
}

/// `name` adopts `key` from Secret `creds`: Ready on it, no rotation, no Conflict, and claims it.
async fn adopts(f: &Fixture, name: &str, key: &str) -> anyhow::Result<()> {
    let o = wait_ikr(&f.ikrs, name, &format!("{name} adopted"), |o| is_true(o, "Ready", "KeyInPlace")).await?;
    assert_eq!(active_key(&o).as_deref(), Some(key));
    assert_eq!(o.status.as_ref().map(|s| (s.phase, s.rotations)), Some((Phase::Idle, 0)));
    assert_ne!(condition(&o, "Degraded").map(|c| c.1).as_deref(), Some("Conflict"), "{:?}", message(&o, "Degraded"));
    assert_eq!(f.env.keys(&f.user).await?.into_keys().collect::<Vec<_>>(), vec![key.to_owned()], "no new key");
    let claim = f.claim(key).await?;
    assert_eq!(claim, Some(format!("rekey:{}", f.owner(name))), "the claim names {name}");
    Ok(())
}

#[tokio::test]
async fn a_resource_renamed_after_a_retain_deletion_adopts_the_key() -> anyhow::Result<()> {
    let f = Fixture::new("rename").await?;
    let spec = json!({"userName": f.user, "secrets": [{"name": "creds"}], "deletionPolicy": "Retain"});
    f.create("old-name", spec.clone()).await?;
    let _op = f.operator().await?;
    let o =
        wait_ikr(&f.ikrs, "old-name", "bootstrapped", |o| phase(o) == Phase::Idle && active_key(o).is_some()).await?;
    let key = active_key(&o).context("key")?;
    assert_eq!(f.claim(&key).await?, Some(format!("rekey:{}", f.owner("old-name"))));
    f.ikrs.delete("old-name", &DeleteParams::default()).await?;
    f.gone("old-name").await?;
    assert_eq!(f.claim(&key).await?, None, "Retain released the claim of the key that stays");
    assert_eq!(f.env.keys(&f.user).await?.get(&key).map(String::as_str), Some("Active"), "key retained");
    f.create("new-name", spec).await?;
    adopts(&f, "new-name", &key).await
}

#[tokio::test]
async fn a_leftover_claim_of_a_resource_that_no_longer_exists_is_taken_over() -> anyhow::Result<()> {
    let f = Fixture::new("stale").await?;
    let key = f.env.create_key(&f.user).await?;
    f.secrets.create(&PostParams::default(), &key_secret("creds", &key)?).await?;
    // As an operator that deleted `gone` before Retain released claims would have left it.
    f.set_claim(&key.access_key_id, &f.owner("gone")).await?;
    f.create("app", json!({"userName": f.user, "secrets": [{"name": "creds"}]})).await?;
    let _op = f.operator().await?;
    adopts(&f, "app", &key.access_key_id).await
}

#[tokio::test]
async fn an_immutable_target_secret_stalls_before_a_key_is_created() -> anyhow::Result<()> {
    let f = Fixture::new("immutable").await?;
    let key = f.env.create_key(&f.user).await?;
    let mut s = key_secret("creds", &key)?;
    s.immutable = Some(true);
    f.secrets.create(&PostParams::default(), &s).await?;
    // A second user whose Secret is immutable before it holds any key: the bootstrap stalls too.
    let other = consenting_user(&f.env, "immutable2", &f.ns).await?;
    let empty: Secret =
        serde_json::from_value(json!({"metadata": {"name": "empty"}, "immutable": true, "stringData": {"X": "y"}}))?;
    f.secrets.create(&PostParams::default(), &empty).await?;
    f.create("app", json!({"userName": f.user, "secrets": [{"name": "creds"}]})).await?;
    f.create("fresh", json!({"userName": other, "secrets": [{"name": "empty"}]})).await?;
    let _op = f.operator().await?;
    wait_ikr(&f.ikrs, "app", "adopted", |o| is_true(o, "Ready", "KeyInPlace")).await?;
    f.rotate("app", "1").await?;
    for (name, secret) in [("app", "creds"), ("fresh", "empty")] {
        let o = wait_ikr(&f.ikrs, name, "SecretImmutable", |o| is_true(o, "Stalled", "SecretImmutable")).await?;
        let m = message(&o, "Stalled").unwrap_or_default();
        assert!(m.contains(&format!("Secret {secret} is immutable")), "{m}");
        assert_eq!(phase(&o), Phase::Idle);
        assert!(f.secrets.get_opt(&format!("{name}-rekey-staging")).await?.is_none(), "no staging Secret");
    }
    let o = f.ikrs.get("app").await?;
    assert_eq!(condition(&o, "Ready").map(|c| c.0).as_deref(), Some("True"), "the Secret still works");
    assert_eq!(f.env.keys(&f.user).await?, active(&[&key]), "no key was created");
    assert!(f.env.keys(&other).await?.is_empty(), "no key was created for the bootstrap either");
    Ok(())
}

/// How many reconciles ended in a stall, by the operator's log.
fn stalls(op: &Operator) -> anyhow::Result<usize> {
    Ok(op.output()?.matches("performing step=\"Stall\"").count())
}

fn set_user(user: &str) -> Patch<serde_json::Value> {
    Patch::Merge(json!({"spec": {"userName": user}}))
}

#[tokio::test]
async fn editing_user_name_mid_rotation_stalls_and_touches_neither_user() -> anyhow::Result<()> {
    let f = Fixture::new("rename-user").await?;
    let old = f.env.create_key(&f.user).await?;
    f.secrets.create(&PostParams::default(), &key_secret("creds", &old)?).await?;
    let deploys: Api<Deployment> = Api::namespaced(f.env.kube.clone(), &f.ns);
    deploys.create(&PostParams::default(), &never_healthy("web")?).await?;
    let other = consenting_user(&f.env, "other-user", &f.ns).await?;
    f.create("app", json!({"userName": f.user, "secrets": [{"name": "creds"}], "retirement": {"deleteAfter": "2s"}}))
        .await?;
    let op = f.operator().await?;
    wait_ikr(&f.ikrs, "app", "adopted", |o| is_true(o, "Ready", "KeyInPlace")).await?;
    f.rotate("app", "1").await?;
    let o = wait_ikr(&f.ikrs, "app", "rolling out", |o| phase(o) == Phase::RollingOut).await?;
    let new = active_key(&o).context("new key")?;
    let both: BTreeMap<String, String> =
        [(old.access_key_id.clone(), "Active".to_owned()), (new.clone(), "Active".to_owned())].into();
    f.ikrs.patch("app", &PatchParams::default(), &set_user(&other)).await?;
    let o = wait_ikr(&f.ikrs, "app", "InvalidSpec", |o| is_true(o, "Stalled", "InvalidSpec")).await?;
    let m = message(&o, "Stalled").unwrap_or_default();
    assert!(m.contains(&format!("from {} to {other}", f.user)), "{m}");
    // The workloads become healthy: a rotation would now retire the old key; the edit holds it.
    let missing: Secret = serde_json::from_value(json!({"metadata": {"name": "missing"}, "stringData": {"k": "v"}}))?;
    f.secrets.create(&PostParams::default(), &missing).await?;
    deployment_ready(&deploys, "web", WAIT).await?;
    let seen = stalls(&op)?;
    f.ikrs
        .patch("app", &PatchParams::default(), &Patch::Merge(&json!({"metadata": {"annotations": {"look": "1"}}})))
        .await?;
    eventually("a reconcile after the rollout", WAIT, || async {
        Ok(if stalls(&op)? > seen { Ok(()) } else { Err("no new reconcile yet".into()) })
    })
    .await?;
    let o = f.ikrs.get("app").await?;
    assert!(is_true(&o, "Stalled", "InvalidSpec") && phase(&o) == Phase::RollingOut, "{:?}", o.status);
    assert_eq!(f.env.keys(&f.user).await?, both, "nothing deactivated or deleted");
    assert!(f.env.keys(&other).await?.is_empty(), "no key created for {other}");
    f.ikrs.patch("app", &PatchParams::default(), &set_user(&f.user)).await?;
    let o = wait_ikr(&f.ikrs, "app", "rotation complete", |o| {
        o.status.as_ref().is_some_and(|s| s.rotations == 1 && s.phase == Phase::Idle)
    })
    .await?;
    assert_eq!(condition(&o, "Stalled").map(|c| c.0).as_deref(), Some("False"));
    assert_eq!(f.env.keys(&f.user).await?, [(new, "Active".to_owned())].into());
    assert!(f.env.keys(&other).await?.is_empty());
    Ok(())
}
