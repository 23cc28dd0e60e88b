//! PURE: the CRD's CEL rules (`x-kubernetes-validations`), so that `kubectl apply`, `--dry-run=server`
//! and a GitOps diff refuse a cross-field mistake with the message `validate` would give after apply.
//! `validate` stays the backstop (and `rekey check` runs it on files): every rule here mirrors one
//! there; a rule CEL cannot express (a time zone's existence, a duration that overflows) lives only
//! there.

use schemars::Schema;
use serde_json::{Value, json};

/// One rule: the CEL expression, the message shown when it fails, and the field it names (relative
/// to the object it sits on; `None`: the object itself).
struct Rule {
    rule: String,
    message: String,
    field: Option<String>,
}

/// A spec duration (`^([0-9]+[dhms])+$`) as seconds, in CEL.
fn seconds(field: &str) -> String {
    format!(
        "{field}.findAll('[0-9]+[dhms]').map(p, int(p.substring(0, size(p) - 1)) * \
         (p.endsWith('d') ? 86400 : p.endsWith('h') ? 3600 : p.endsWith('m') ? 60 : 1)).sum()"
    )
}

/// The value of an optional string field, or its default.
fn or_default(field: &str, default: &str) -> String {
    format!("(has(self.{field}) ? self.{field} : '{default}')")
}

fn add(schema: &mut Schema, rules: Vec<Rule>) {
    let list: Vec<Value> = rules
        .into_iter()
        .map(|r| {
            let mut v = json!({"rule": r.rule, "message": r.message});
            if let Some(f) = r.field {
                v["fieldPath"] = json!(f);
            }
            v
        })
        .collect();
    schema.insert("x-kubernetes-validations".to_owned(), Value::Array(list));
}

/// `spec`: the key's age limits.
pub fn spec(schema: &mut Schema) {
    add(
        schema,
        vec![
            Rule {
                rule: format!("{} > 0", seconds("self.maxKeyAge")),
                message: "spec.maxKeyAge must be more than 0s".into(),
                field: Some(".maxKeyAge".into()),
            },
            Rule {
                rule: format!("{} < {}", seconds("self.rotateBefore"), seconds("self.maxKeyAge")),
                message: "spec.rotateBefore must be less than spec.maxKeyAge".into(),
                field: Some(".rotateBefore".into()),
            },
        ],
    );
}

/// `spec.workloads`.
pub fn workloads(schema: &mut Schema) {
    add(
        schema,
        vec![Rule {
            rule: format!("{} > 0", seconds("self.rolloutTimeout")),
            message: "spec.workloads.rolloutTimeout must be more than 0s".into(),
            field: Some(".rolloutTimeout".into()),
        }],
    );
}

/// `spec.schedule.windows[]`.
pub fn window(schema: &mut Schema) {
    add(
        schema,
        vec![Rule {
            rule: "self.start != self.end".to_owned(),
            message: "start and end are equal: the window would be empty".into(),
            field: Some(".end".into()),
        }],
    );
}

const SECRET: &str = "'{{ .SecretAccessKey }}'";
const SES_PASSWORD: &str = "'{{ .SesSmtpPassword }}'";

/// `spec.secrets[]`: what each format needs, and the fields that belong to another format.
pub fn secret_target(schema: &mut Schema) {
    let rule = |rule: String, message: &str, field: &str| Rule {
        rule,
        message: message.to_owned(),
        field: Some(format!(".{field}")),
    };
    // Two Secret keys of one format (with their defaults) must not be the same key: the second
    // value would overwrite the first.
    let differ = |format: &str, (a, a_default): (&str, &str), (b, b_default): (&str, &str)| {
        let rule_text =
            format!("self.format != '{format}' || {} != {}", or_default(a, a_default), or_default(b, b_default));
        rule(rule_text, &format!("{a} and {b} must differ"), b)
    };
    // A field of another format is refused at apply time only: rekey ignores it, so `validate`
    // does not stall a resource that already has one (and CEL ratcheting lets it be updated).
    let only = |field: &str, format: &str| {
        rule(
            format!("!has(self.{field}) || self.format == '{format}'"),
            &format!("{field} belongs to format {format}"),
            field,
        )
    };
    let uses_ses = format!("self.template.exists(k, self.template[k].contains({SES_PASSWORD}))");
    add(
        schema,
        vec![
            differ("env", ("accessKeyIdKey", "AWS_ACCESS_KEY_ID"), ("secretAccessKeyKey", "AWS_SECRET_ACCESS_KEY")),
            differ("sesSmtp", ("usernameKey", "SMTP_USERNAME"), ("passwordKey", "SMTP_PASSWORD")),
            rule(
                "self.format != 'template' || (has(self.template) && size(self.template) > 0)".to_owned(),
                "format template needs a non-empty template map",
                "template",
            ),
            rule(
                format!(
                    "self.format != 'template' || !has(self.template) || self.template.exists(k, \
                     self.template[k].contains({SECRET}) || self.template[k].contains({SES_PASSWORD}))"
                ),
                "the template uses neither {{ .SecretAccessKey }} nor {{ .SesSmtpPassword }} so no key would be delivered",
                "template",
            ),
            rule(
                "!has(self.template) || self.template.all(k, k.matches('^[-._a-zA-Z0-9]+$'))".to_owned(),
                "every template key must be a valid Secret key (letters, digits, '-', '_' and '.')",
                "template",
            ),
            rule(
                format!(
                    "has(self.region) || !(self.format == 'sesSmtp' || (self.format == 'template' && \
                     has(self.template) && {uses_ses}))"
                ),
                "format sesSmtp, and a template using {{ .SesSmtpPassword }}, need region (the SES region the SMTP \
                 password is for)",
                "region",
            ),
            only("accessKeyIdKey", "env"),
            only("secretAccessKeyKey", "env"),
            only("profile", "credentialsFile"),
            only("template", "template"),
            only("usernameKey", "sesSmtp"),
            only("passwordKey", "sesSmtp"),
        ],
    );
}
