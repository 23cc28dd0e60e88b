use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::json;

use super::*;
use crate::api::{ACCESS_KEY_ANNOTATION, SecretFormat, SecretTarget};
use crate::secrets::{self, AccessKey, RenderContext};

fn secret(name: &str, data: serde_json::Value) -> Secret {
    serde_json::from_value(json!({"metadata": {"name": name}, "data": data})).unwrap()
}

fn api_code<T: std::fmt::Debug>(r: Result<T, kube::Error>) -> (u16, String) {
    match r {
        Err(kube::Error::Api(s)) => (s.code, s.reason),
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn data(s: &Secret, key: &str) -> Option<String> {
    s.data.as_ref()?.get(key).map(|v| String::from_utf8(v.0.clone()).unwrap())
}

#[tokio::test]
async fn a_secret_round_trips_through_the_typed_api() {
    let (fake, client) = FakeKube::new();
    let api: Api<Secret> = Api::default_namespaced(client);
    assert_eq!(api_code(api.get("s").await), (404, "NotFound".into()));
    let created = api.create(&PostParams::default(), &secret("s", json!({"a": "MQ=="}))).await.unwrap();
    assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());
    assert_eq!(created.type_.as_deref(), Some("Opaque"));
    assert_eq!(
        api_code(api.create(&PostParams::default(), &secret("s", json!({}))).await),
        (409, "AlreadyExists".into())
    );

    let patched = api
        .patch("s", &PatchParams::default(), &Patch::Merge(json!({"data": {"a": null, "b": "Mg=="}})))
        .await
        .unwrap();
    assert_eq!((data(&patched, "a"), data(&patched, "b")), (None, Some("2".into())));
    assert_ne!(patched.metadata.resource_version, created.metadata.resource_version);
    let missing = api.patch("nope", &PatchParams::default(), &Patch::Merge(json!({}))).await;
    assert_eq!(api_code(missing), (404, "NotFound".into()));

    let body = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "data": {"c": "Mw=="}});
    let dry = api.patch("s", &PatchParams::apply("m").dry_run(), &Patch::Apply(&body)).await.unwrap();
    assert_eq!(data(&dry, "c"), Some("3".into()), "a dry run answers with the would-be object");
    assert_eq!(data(&api.get("s").await.unwrap(), "c"), None, "and persists nothing");
    let applied = api.patch("s", &PatchParams::apply("m"), &Patch::Apply(&body)).await.unwrap();
    assert_eq!((data(&applied, "b"), data(&applied, "c")), (Some("2".into()), Some("3".into())));
    let last = fake.requests().pop().unwrap();
    assert_eq!((last.verb, last.field_manager.as_deref(), last.dry_run), ("patch", Some("m"), false));
    assert!(
        fake.requests().iter().any(|r| r.dry_run && r.content_type.as_deref() == Some("application/apply-patch+yaml"))
    );

    // A replace carrying an old resourceVersion lost a race: 409, nothing written.
    let stale = created.clone();
    assert_eq!(api_code(api.replace("s", &PostParams::default(), &stale).await), (409, "Conflict".into()));
    let fresh = api.get("s").await.unwrap();
    api.replace("s", &PostParams::default(), &fresh).await.unwrap();

    api.delete("s", &DeleteParams::default()).await.unwrap();
    assert!(fake.get(&kind_path::<Secret>(), "default", "s").is_none());
    assert_eq!(api_code(api.delete("s", &DeleteParams::default()).await), (404, "NotFound".into()));
}

#[tokio::test]
async fn an_immutable_secret_refuses_new_data_but_not_new_labels() {
    let (fake, client) = FakeKube::new();
    fake.put(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "immutable": true,
        "data": {"a": "MQ=="}}));
    let api: Api<Secret> = Api::default_namespaced(client);
    let change = api.patch("s", &PatchParams::default(), &Patch::Merge(json!({"data": {"a": "Mg=="}}))).await;
    assert_eq!(api_code(change), (422, "Invalid".into()));
    api.patch("s", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}}))).await.unwrap();
}

#[tokio::test]
async fn lists_filter_by_namespace_and_label() {
    let (fake, client) = FakeKube::new();
    for (ns, name, label) in [("default", "a", "yes"), ("default", "b", "no"), ("other", "c", "yes")] {
        fake.put(json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": ns, "labels": {"managed": label}}}));
    }
    let api: Api<Secret> = Api::default_namespaced(client.clone());
    let names = |l: kube::core::ObjectList<Secret>| {
        l.items.iter().map(|s| s.metadata.name.clone().unwrap()).collect::<Vec<_>>()
    };
    assert_eq!(names(api.list(&ListParams::default()).await.unwrap()), ["a", "b"]);
    assert_eq!(names(api.list(&ListParams::default().labels("managed=yes")).await.unwrap()), ["a"]);
    let all: Api<Secret> = Api::all(client);
    assert_eq!(names(all.list(&ListParams::default().labels("managed=yes")).await.unwrap()), ["a", "c"]);
}

#[tokio::test]
async fn a_finalizer_holds_a_delete_until_it_is_removed() {
    let (fake, client) = FakeKube::new();
    fake.put(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "finalizers": ["x/y"]}}));
    let api: Api<Secret> = Api::default_namespaced(client.clone());
    api.delete("s", &DeleteParams::default()).await.unwrap();
    assert!(api.get("s").await.unwrap().metadata.deletion_timestamp.is_some());
    let remove = json!([{"op": "test", "path": "/metadata/finalizers", "value": ["x/y"]},
        {"op": "remove", "path": "/metadata/finalizers/0"}]);
    // As kube's finalizer helper sends it (kube does not re-export json_patch's type).
    let req = http::Request::patch("/api/v1/namespaces/default/secrets/s")
        .header(http::header::CONTENT_TYPE, "application/json-patch+json")
        .body(serde_json::to_vec(&remove).unwrap())
        .unwrap();
    client.request::<Secret>(req).await.unwrap();
    assert_eq!(api_code(api.get("s").await), (404, "NotFound".into()));
}

#[tokio::test]
async fn injected_failures_reach_the_caller_as_the_apiserver_sends_them() {
    let (fake, client) = FakeKube::new();
    fake.put(json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {}}}));
    fake.fail("patch", "deployments", 403, "Forbidden");
    let err = crate::workloads::stamp(&client, "default", &web(), "AKIA1", "rekey/r", "r", None).await.unwrap_err();
    assert_eq!(err.category(), "KubeForbidden");
    fake.clear_failures();
    crate::workloads::stamp(&client, "default", &web(), "AKIA1", "rekey/r", "r", None).await.unwrap();
    let d: Deployment = fake.object("default", "web").unwrap();
    let stamp = d.spec.unwrap().template.metadata.unwrap().annotations.unwrap()[ACCESS_KEY_ANNOTATION].clone();
    assert_eq!((stamp.as_str(), d.metadata.generation), ("AKIA1", Some(2)));

    // A lost answer: the write happened, the client saw a transport error.
    fake.lose_next_response("patch", "deployments");
    let err = crate::workloads::stamp(&client, "default", &web(), "AKIA2", "rekey/r", "r", None).await.unwrap_err();
    assert_eq!(err.category(), "KubeError");
    let d: Deployment = fake.object("default", "web").unwrap();
    assert_eq!(d.spec.unwrap().template.metadata.unwrap().annotations.unwrap()[ACCESS_KEY_ANNOTATION], "AKIA2");
}

fn target(name: &str) -> SecretTarget {
    SecretTarget {
        name: name.into(),
        format: SecretFormat::Env,
        access_key_id_key: None,
        secret_access_key_key: None,
        profile: None,
        template: None,
        region: None,
        username_key: None,
        password_key: None,
    }
}

#[tokio::test]
async fn write_target_applies_only_rekeys_keys_under_its_own_manager() {
    let (fake, client) = FakeKube::new();
    let api: Api<Secret> = Api::default_namespaced(client);
    fake.put(
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "app"}, "stringData": {"OTHER": "kept"}}),
    );
    let key = AccessKey { id: "AKIAAAAAAAAAAAAAAAAA".into(), secret: SecretString::from("s3cr3t".to_owned()) };
    let t = target("app");
    secrets::write_target(&api, "r", &t, &key, &RenderContext::default(), true).await.unwrap();
    assert_eq!(data(&fake.object::<Secret>("default", "app").unwrap(), "AWS_ACCESS_KEY_ID"), None, "dry run");
    secrets::write_target(&api, "r", &t, &key, &RenderContext::default(), false).await.unwrap();
    let s: Secret = fake.object("default", "app").unwrap();
    assert_eq!(secrets::read_key(&t, &s).unwrap().secret.expose_secret(), "s3cr3t");
    assert_eq!(data(&s, "OTHER"), Some("kept".into()));
    let req = fake.requests().pop().unwrap();
    assert_eq!((req.field_manager.as_deref(), req.force), (Some("rekey/r"), true));
    assert!(
        fake.owners(&kind_path::<Secret>(), "default", "app")["rekey/r"].contains(&".data.AWS_ACCESS_KEY_ID".into())
    );

    // The preflight's dry run on a missing target creates nothing; clearing removes only rekey's keys.
    secrets::write_target(&api, "r", &target("new"), &key, &RenderContext::default(), true).await.unwrap();
    assert!(fake.object::<Secret>("default", "new").is_none());
    secrets::clear_target(&api, "r", &t).await.unwrap();
    let s: Secret = fake.object("default", "app").unwrap();
    assert_eq!((data(&s, "AWS_ACCESS_KEY_ID"), data(&s, "OTHER")), (None, Some("kept".into())));
}

#[tokio::test]
async fn write_staging_updates_the_existing_staging_secret_only() {
    let (fake, client) = FakeKube::new();
    let api: Api<Secret> = Api::default_namespaced(client);
    let key = AccessKey { id: "AKIABBBBBBBBBBBBBBBB".into(), secret: SecretString::from("s3cr3t".to_owned()) };
    // The staging Secret is created by ensure_staging; a write to a missing one fails.
    let err = secrets::write_staging(&api, "r", &key, false).await.unwrap_err();
    assert_eq!(err.code, 404);
    let owner = serde_json::from_value(json!({"apiVersion": "rekey.dev/v1alpha1", "kind": "IamKeyRotation",
        "name": "r", "uid": "u-1", "controller": true}))
    .unwrap();
    secrets::ensure_staging(&api, "r", owner).await.unwrap();
    secrets::write_staging(&api, "r", &key, true).await.unwrap();
    let staged = || fake.object::<Secret>("default", &secrets::staging_name("r")).unwrap();
    assert_eq!(data(&staged(), "AWS_ACCESS_KEY_ID"), None, "dry run");
    secrets::write_staging(&api, "r", &key, false).await.unwrap();
    let s = staged();
    assert_eq!(secrets::read_key(&secrets::staging_target("r"), &s).unwrap().id, key.id);
    assert_eq!(s.metadata.annotations.unwrap()[ACCESS_KEY_ANNOTATION], key.id);
    let verbs: Vec<_> = fake.requests().iter().map(|r| (r.verb, r.dry_run, r.code)).collect();
    assert_eq!(verbs, [("patch", false, 404), ("create", false, 201), ("patch", true, 200), ("patch", false, 200)]);
}

fn web() -> crate::api::WorkloadRef {
    crate::api::WorkloadRef { kind: crate::api::WorkloadKind::Deployment, name: "web".into() }
}
