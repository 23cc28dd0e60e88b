//! The functions of `secrets` that touch the cluster, against the fake apiserver (field ownership,
//! resourceVersion preconditions and 409s as a real one answers them).

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use secrecy::SecretString;
use serde_json::json;

use super::*;
use crate::error::Error;
use crate::fake::kube::FakeKube;

fn file_target(name: &str, profile: &str) -> SecretTarget {
    SecretTarget {
        name: name.into(),
        format: SecretFormat::CredentialsFile,
        access_key_id_key: None,
        secret_access_key_key: None,
        profile: Some(profile.into()),
        template: None,
        region: None,
        username_key: None,
        password_key: None,
    }
}

fn key(id: &str) -> AccessKey {
    AccessKey { id: id.into(), secret: SecretString::from(format!("secret-of-{id}")) }
}

fn stored(fake: &FakeKube, name: &str) -> Secret {
    fake.object::<Secret>("default", name).unwrap()
}

fn text(s: &Secret, key: &str) -> Option<String> {
    s.data.as_ref()?.get(key).map(|v| String::from_utf8(v.0.clone()).unwrap())
}

fn annotation(s: &Secret, key: &str) -> Option<String> {
    s.metadata.annotations.as_ref()?.get(key).cloned()
}

/// The key id each profile of the Secret's credentials file holds.
fn profiles(s: &Secret, names: &[&str]) -> Vec<Option<String>> {
    names.iter().map(|p| read_key(&file_target("x", p), s).map(|k| k.id)).collect()
}

async fn write(api: &Api<Secret>, resource: &str, t: &SecretTarget, id: &str) -> Result<(), SecretWriteError> {
    write_target(api, resource, t, &key(id), &RenderContext::default(), false).await
}

#[tokio::test]
async fn two_resources_writing_profiles_of_one_secret_both_survive() {
    let (fake, client) = FakeKube::new();
    let api: Api<Secret> = Api::default_namespaced(client);
    // A profile a person keeps in the same file, and another key of the Secret.
    fake.put(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "aws"}, "stringData": {
        "credentials": "[default]\naws_access_key_id = AKIAHUMAN\naws_secret_access_key = h\n", "OTHER": "kept"}}));
    let (a, b) = (file_target("aws", "a"), file_target("aws", "b"));
    write(&api, "ra", &a, "AKIAA1").await.unwrap();
    write(&api, "rb", &b, "AKIAB1").await.unwrap();
    // A rotation of the first: the second's profile is read back and kept.
    write(&api, "ra", &a, "AKIAA2").await.unwrap();
    let s = stored(&fake, "aws");
    assert_eq!(
        profiles(&s, &["default", "a", "b"]),
        [Some("AKIAHUMAN".into()), Some("AKIAA2".into()), Some("AKIAB1".into())]
    );
    assert_eq!(text(&s, "OTHER").as_deref(), Some("kept"));
    assert_eq!(annotation(&s, "rekey.dev/profile.a").as_deref(), Some("ra"));
    assert_eq!(annotation(&s, "rekey.dev/profile.b").as_deref(), Some("rb"));
    assert_eq!(conflict(&a, &s, &field_manager("ra"), &|_| true), None);
    assert!(conflict(&file_target("aws", "b"), &s, &field_manager("ra"), &|_| true).is_some(), "b is rb's");
    // Each write is a read, then an apply conditional on it.
    let last: Vec<_> = fake.requests().iter().rev().take(2).map(|r| (r.verb, r.force)).collect();
    assert_eq!(last, [("patch", true), ("get", false)]);
}

#[tokio::test]
async fn a_write_on_a_stale_read_is_a_conflict_and_loses_nothing() {
    let (fake, client) = FakeKube::new();
    let api: Api<Secret> = Api::default_namespaced(client);
    let (a, b) = (file_target("aws", "a"), file_target("aws", "b"));
    write(&api, "ra", &a, "AKIAA1").await.unwrap();
    let read_by_b = api.get("aws").await.unwrap();
    // The first resource rotates between the second's read and its write.
    write(&api, "ra", &a, "AKIAA2").await.unwrap();
    let ctx = RenderContext::default();
    let err = apply_target(&api, "rb", &b, &key("AKIAB1"), &ctx, Some(&read_by_b), false).await.unwrap_err();
    assert_eq!((err.code, err.reason.as_str()), (409, "Conflict"));
    let err = Error::from(err);
    assert!(matches!(err, Error::Conflict) && err.category() == "Conflict", "{err}");
    assert_eq!(profiles(&stored(&fake, "aws"), &["a", "b"]), [Some("AKIAA2".into()), None]);
    // The retry reads afresh.
    write(&api, "rb", &b, "AKIAB1").await.unwrap();
    assert_eq!(profiles(&stored(&fake, "aws"), &["a", "b"]), [Some("AKIAA2".into()), Some("AKIAB1".into())]);
}

#[tokio::test]
async fn creating_a_missing_secret_does_not_overwrite_one_created_since_the_read() {
    let (fake, client) = FakeKube::new();
    let api: Api<Secret> = Api::default_namespaced(client);
    let (a, b) = (file_target("aws", "a"), file_target("aws", "b"));
    // Both read "missing"; the first creates it.
    write(&api, "ra", &a, "AKIAA1").await.unwrap();
    let ctx = RenderContext::default();
    let err = apply_target(&api, "rb", &b, &key("AKIAB1"), &ctx, None, false).await.unwrap_err();
    assert!(matches!(Error::from(err), Error::Conflict));
    assert_eq!(profiles(&stored(&fake, "aws"), &["a", "b"]), [Some("AKIAA1".into()), None]);
    write(&api, "rb", &b, "AKIAB1").await.unwrap();
    assert_eq!(profiles(&stored(&fake, "aws"), &["a", "b"]), [Some("AKIAA1".into()), Some("AKIAB1".into())]);
}

#[tokio::test]
async fn concurrent_writers_of_one_file_both_end_up_in_it() {
    let (fake, client) = FakeKube::new();
    let api: Api<Secret> = Api::default_namespaced(client);
    // As the reconciler does: a Conflict is retried on a fresh read.
    let retrying = |resource: &'static str, profile: &'static str| {
        let api = api.clone();
        async move {
            for _ in 0..5 {
                let result = write(&api, resource, &file_target("aws", profile), &format!("AKIA{profile}")).await;
                match result.map_err(Error::from) {
                    Err(Error::Conflict) => continue,
                    other => return other,
                }
            }
            panic!("{resource} kept conflicting")
        }
    };
    let (ra, rb) = tokio::join!(retrying("ra", "a"), retrying("rb", "b"));
    ra.unwrap();
    rb.unwrap();
    assert_eq!(profiles(&stored(&fake, "aws"), &["a", "b"]), [Some("AKIAa".into()), Some("AKIAb".into())]);
}

#[tokio::test]
async fn clearing_takes_out_one_profile_and_the_last_one_takes_the_key() {
    let (fake, client) = FakeKube::new();
    let api: Api<Secret> = Api::default_namespaced(client);
    fake.put(
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "aws"}, "stringData": {"OTHER": "kept"}}),
    );
    let (a, b) = (file_target("aws", "a"), file_target("aws", "b"));
    write(&api, "ra", &a, "AKIAA1").await.unwrap();
    write(&api, "rb", &b, "AKIAB1").await.unwrap();
    // The first resource's key is gone, whichever resource wrote the file last.
    clear_target(&api, "ra", &a).await.unwrap();
    let s = stored(&fake, "aws");
    assert_eq!(profiles(&s, &["a", "b"]), [None, Some("AKIAB1".into())]);
    assert_eq!(annotation(&s, "rekey.dev/profile.a"), None);
    assert_eq!(annotation(&s, "rekey.dev/profile.b").as_deref(), Some("rb"));
    clear_target(&api, "rb", &b).await.unwrap();
    let s = stored(&fake, "aws");
    assert_eq!((text(&s, CREDENTIALS_KEY), text(&s, "OTHER").as_deref()), (None, Some("kept")));
    assert_eq!(annotation(&s, "rekey.dev/profile.b"), None);
    clear_target(&api, "rb", &file_target("gone", "b")).await.unwrap();
}

fn owner(uid: &str) -> OwnerReference {
    serde_json::from_value(json!({"apiVersion": "rekey.dev/v1alpha1", "kind": "IamKeyRotation", "name": "r",
        "uid": uid, "controller": true}))
    .unwrap()
}

#[tokio::test]
async fn a_staging_named_secret_rekey_did_not_create_is_neither_taken_over_nor_deleted() {
    let (fake, client) = FakeKube::new();
    let api: Api<Secret> = Api::default_namespaced(client);
    let name = staging_name("r");
    let foreign = [
        json!({"name": name}),
        json!({"name": name, "labels": {MANAGED_LABEL: "r"}}),
        // Left by an earlier resource of the same name (its owner reference names another uid).
        json!({"name": name, "labels": {MANAGED_LABEL: "r"}, "ownerReferences": [owner("u-old")]}),
    ];
    for meta in foreign {
        fake.put(json!({"apiVersion": "v1", "kind": "Secret", "metadata": meta, "stringData": {"theirs": "x"}}));
        let before = stored(&fake, &name);
        fake.clear_requests();
        let err = ensure_staging(&api, "r", owner("u-1")).await.unwrap_err();
        assert!(err.to_string().contains("rekey did not create"), "{err}");
        assert_eq!(Error::from(err).category(), "SecretWriteFailed", "a person must act: no quick retry");
        let err = delete_staging(&api, "r").await;
        if meta_has_owner(&before) {
            // Without the uid, an earlier resource's staging Secret of this name is rekey's: it goes.
            err.unwrap();
            assert!(fake.object::<Secret>("default", &name).is_none());
            continue;
        }
        assert!(err.unwrap_err().to_string().contains("will not take it over, change or delete it"));
        assert_eq!(stored(&fake, &name), before, "untouched");
        let verbs: Vec<_> = fake.requests().iter().map(|r| (r.verb, r.code)).collect();
        assert_eq!(verbs, [("create", 409), ("get", 200), ("get", 200)], "nothing written or deleted");
    }
}

fn meta_has_owner(s: &Secret) -> bool {
    s.metadata.owner_references.as_ref().is_some_and(|o| !o.is_empty())
}

#[tokio::test]
async fn rekeys_own_staging_secret_is_accepted_again_and_deleted() {
    let (fake, client) = FakeKube::new();
    let api: Api<Secret> = Api::default_namespaced(client);
    assert!(!ensure_staging(&api, "r", owner("u-1")).await.unwrap(), "created empty: nothing to clear");
    write_staging(&api, "r", &key("AKIASTAGED"), false).await.unwrap();
    // A second attempt finds it (409) and accepts it as its own, without changing it, and says it
    // holds a leftover to clear.
    let before = stored(&fake, &staging_name("r"));
    assert!(ensure_staging(&api, "r", owner("u-1")).await.unwrap());
    assert_eq!(stored(&fake, &staging_name("r")), before);
    clear_staging(&api, "r").await.unwrap();
    assert!(!ensure_staging(&api, "r", owner("u-1")).await.unwrap(), "cleared: nothing left to clear");
    delete_staging(&api, "r").await.unwrap();
    assert!(fake.object::<Secret>("default", &staging_name("r")).is_none());
    delete_staging(&api, "r").await.unwrap();
    let err = |r: Result<(), SecretWriteError>| r.unwrap_err().to_string();
    assert!(!err(write_staging(&api, "r", &key("AKIASTAGED"), false).await).contains("secret-of"));
}
