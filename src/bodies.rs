//! The JSON Schema of every body an agent or client sends, whichever door it comes through
//! (the HTTP request body, or the payload on `acc.in.*`): the request bodies of the OpenAPI
//! document (`http::openapi`) and the inbound messages of the AsyncAPI document
//! (`asyncapi`).
//!
//! One source per rule. A field that is also stored takes its schema from the stored message's
//! schema under `subjects/schemas/` (a name's length, an id's pattern, a priority's range); a
//! field only a request has (a duration, a claim's `max`) is written here from the constant the
//! parser checks. The tests below hold both to the parsers' constants and run bodies through
//! schema and parser alike, so neither can drift from the code.
//!
//! What a schema cannot say is in the field's description: lengths are bytes of UTF-8 where JSON
//! Schema counts characters, a duration's range, the size of a heartbeat's `details` as JSON.
//! Optional fields accept `null` as absent, as the parsers do.

use std::sync::LazyLock;

use serde_json::{Map, Value, json};

use crate::admission::{MAX_DETAILS_BYTES, MAX_STATUS_LEN};
use crate::domain::{MAX_CAPABILITIES, MAX_CAPABILITY_LEN, MAX_ID_LEN};
use crate::tasks::api::MAX_ERROR_MESSAGE;
use crate::tasks::spec::{
    BACKOFF_MULTIPLIER, DEFAULT_MAX_ATTEMPTS, DEFAULT_PRIORITY, MAX_CLAIM, MAX_CLAIM_WAIT,
    MAX_TIMEOUT, MIN_TIMEOUT,
};

/// The stored schemas a request field may be taken from, by file name.
const STORED: [(&str, &str); 5] = [
    (
        "registration.json",
        include_str!("../subjects/schemas/registration.json"),
    ),
    (
        "heartbeat.json",
        include_str!("../subjects/schemas/heartbeat.json"),
    ),
    (
        "task_result.json",
        include_str!("../subjects/schemas/task_result.json"),
    ),
    ("event.json", include_str!("../subjects/schemas/event.json")),
    (
        "task_submission.json",
        include_str!("../subjects/schemas/task_submission.json"),
    ),
];

static PARSED: LazyLock<Vec<(&'static str, Value)>> = LazyLock::new(|| {
    STORED
        .iter()
        .map(|(name, text)| {
            let schema = serde_json::from_str(text)
                .unwrap_or_else(|e| panic!("subjects/schemas/{name} is not JSON: {e}"));
            (*name, schema)
        })
        .collect()
});

/// The stored schema `file` (one of [`STORED`]).
pub fn stored_schema(file: &str) -> &'static Value {
    PARSED
        .iter()
        .find(|(name, _)| *name == file)
        .map(|(_, schema)| schema)
        .unwrap_or_else(|| panic!("{file} is not one of the stored schemas bodies reads"))
}

/// The property `field` of the stored schema `file`, with its local `$ref`s inlined and its
/// `description` dropped (the stored one speaks of the stored message), so that it stands alone
/// in another document.
fn stored(file: &str, field: &str) -> Value {
    let schema = stored_schema(file);
    let mut property = schema["properties"][field].clone();
    assert!(
        property.is_object(),
        "subjects/schemas/{file} has no property {field}"
    );
    inline_refs(&mut property, schema);
    if let Value::Object(map) = &mut property {
        map.remove("description");
    }
    property
}

/// Replaces each `{"$ref": "#/$defs/x", ...}` with the definition, keeping sibling keywords.
pub fn inline_refs(value: &mut Value, root: &Value) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(target)) = map.get("$ref").cloned() {
                let name = target
                    .strip_prefix("#/$defs/")
                    .unwrap_or_else(|| panic!("only local $defs refs are inlined: {target}"));
                let mut definition = root["$defs"][name].clone();
                inline_refs(&mut definition, root);
                map.remove("$ref");
                if let Value::Object(definition) = definition {
                    for (key, value) in definition {
                        map.entry(key).or_insert(value);
                    }
                }
            }
            for value in map.values_mut() {
                inline_refs(value, root);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| inline_refs(v, root)),
        _ => {}
    }
}

/// `schema`, or `null` (an optional field the parser reads `null` as absent).
fn nullable(schema: Value) -> Value {
    json!({"anyOf": [schema, {"type": "null"}]})
}

/// `schema` with `description`.
fn described(mut schema: Value, description: impl Into<String>) -> Value {
    schema["description"] = Value::String(description.into());
    schema
}

/// A non-blank string of at most `max` bytes (`domain::required_string`).
fn text(max: usize) -> Value {
    json!({"type": "string", "minLength": 1, "maxLength": max, "pattern": "\\S"})
}

/// The regular expression of an id (`domain::AgentId`, `domain::TaskId`).
pub fn id_pattern() -> String {
    format!("^[A-Za-z0-9_-]{{1,{MAX_ID_LEN}}}$")
}

/// The syntax of a duration (`domain::parse_duration`): a number of seconds, or numbers with
/// units (`500ms`, `90s`, `5m`, `1h 30m`). What a schema can say of humantime's grammar; the
/// parser is the judge.
pub const DURATION_PATTERN: &str = "^\\s*[0-9]+\\s*([a-zµ]+\\s*)?([0-9]+\\s*[a-zµ]+\\s*)*$";

fn duration(description: &str) -> Value {
    json!({
        "type": "string", "minLength": 1, "maxLength": 64, "pattern": DURATION_PATTERN,
        "examples": ["500ms", "90s", "5m"], "description": description,
    })
}

fn object(properties: Value, required: &[&str], description: &str) -> Value {
    json!({
        "type": "object",
        "description": description,
        "required": required,
        "properties": properties,
    })
}

/// `POST /orchestrator/register`, `acc.in.register`.
pub fn register() -> Value {
    let file = "registration.json";
    object(
        json!({
            "agent_id": described(stored(file, "agent_id"), "The registering agent; must equal the token's agent_id."),
            "name": described(stored(file, "name"), "Not blank; at most 256 bytes of UTF-8."),
            "base_url": described(
                {
                    let mut url = stored(file, "base_url");
                    url["pattern"] = json!("^[hH][tT][tT][pP][sS]?://[^\\s/?#]\\S*$");
                    url
                },
                "An http or https URL with a host, without whitespace; at most 2048 bytes.",
            ),
            "capabilities": described(stored(file, "capabilities"), "At most 256 non-blank strings of at most 128 bytes."),
            "max_concurrent_tasks": nullable(described(stored(file, "max_concurrent_tasks"), "Most live task attempts at once; 1 when absent.")),
            "dispatch": nullable(described(stored(file, "dispatch"), "\"push\": the orchestrator delivers tasks (base_url under PUSH_ALLOWED_URLS, else 400 PUSH_URL_NOT_ALLOWED); \"pull\" (the default): the agent claims them.")),
            "push_over": nullable(described(stored(file, "push_over"), "With dispatch \"push\": \"http\" (the default) or \"nats\".")),
        }),
        &["agent_id", "name", "base_url", "capabilities"],
        "A registration. Other members are ignored.",
    )
}

/// `POST /orchestrator/heartbeat`, `acc.in.heartbeat`.
pub fn heartbeat() -> Value {
    let file = "heartbeat.json";
    object(
        json!({
            "agent_id": described(stored(file, "agent_id"), "The agent; must equal the token's agent_id. Missing or empty: 400 MISSING_AGENT_ID."),
            "status": nullable(described(stored(file, "status"), "\"online\" when absent.")),
            "details": {"description": format!("Any JSON value, at most {MAX_DETAILS_BYTES} bytes as JSON.")},
        }),
        &["agent_id"],
        "A heartbeat from a registered agent (else 404 AGENT_NOT_FOUND).",
    )
}

/// `POST /orchestrator/tasks/{task_id}/callback`, `acc.in.task_result.<task_id>`.
///
/// For a task the orchestrator queued, `status` is `running`, `succeeded` or `failed` (with an
/// `error`); for any other task id (Gate 1), any status of the stored pattern.
pub fn task_callback() -> Value {
    let file = "task_result.json";
    let mut status = stored(file, "status");
    assert_eq!(
        status["pattern"],
        format!("^[A-Za-z0-9_-]{{1,{MAX_STATUS_LEN}}}$")
    );
    status["description"] = json!(
        "\"running\", \"succeeded\" or \"failed\" for a task the orchestrator queued; any word of letters, digits, '-' and '_' for another task id."
    );
    status["examples"] = json!(["succeeded", "running", "failed"]);
    object(
        json!({
            "status": status,
            "result": {"description": "Any JSON value: the task's result."},
            "error": {
                "description": format!(
                    "Why the attempt failed; required with status \"failed\" for a task the orchestrator queued, as {{message (not blank, at most {MAX_ERROR_MESSAGE} bytes), retryable? (false dead-letters the task at once)}} or a bare string (a retryable message). Any JSON value for another task id."
                ),
                "examples": [{"message": "upstream timed out", "retryable": true}],
            },
            "progress": {"description": "Any JSON value, with status \"running\"."},
            "trace_id": nullable(described(stored(file, "trace_id"), "A trace id of the agent's; not blank, at most 128 bytes.")),
            "task_id": nullable(described(json!({"type": "string", "pattern": id_pattern()}), "When present, must equal the task id of the path.")),
            "agent_id": nullable(described(json!({"type": "string", "pattern": id_pattern()}), "When present, must equal the token's agent_id.")),
        }),
        &["status"],
        "A report on a task: its progress or its outcome.",
    )
}

/// `POST /orchestrator/events`, `acc.in.event`.
pub fn event() -> Value {
    let file = "event.json";
    let mut time = stored(file, "time");
    time["maxLength"] = json!(64);
    object(
        json!({
            "event_id": described(stored(file, "event_id"), "The dedupe id, scoped to the emitting agent: 1 to 128 visible ASCII characters, no spaces."),
            "type": described(stored(file, "type"), "Not blank; at most 256 bytes."),
            "source": described(stored(file, "source"), "The agent the event is about; must equal the token's agent_id."),
            "data": {"description": "Any JSON value (null included); required."},
            "time": described(time, "When it happened (RFC 3339)."),
            "trace_id": nullable(described(stored(file, "trace_id"), "A trace id of the agent's; not blank, at most 128 bytes.")),
        }),
        &["event_id", "type", "source", "data", "time"],
        "An event.",
    )
}

/// `POST /orchestrator/tasks`, `acc.in.task_submit`.
pub fn task_submit() -> Value {
    let file = "task_submission.json";
    let mut capability = stored(file, "capability");
    capability["pattern"] = json!("\\S");
    object(
        json!({
            "task_id": nullable(described(stored(file, "task_id"), "The dedupe id; generated when absent. The same id with another body: 409 TASK_ID_CONFLICT.")),
            "capability": described(capability, "What the task needs; not blank, at most 128 bytes."),
            "input": {"description": "Any JSON value, handed to the agent."},
            "priority": nullable(described(
                {
                    let mut p = stored(file, "priority");
                    p["default"] = json!(DEFAULT_PRIORITY);
                    p
                },
                "1 (first) to 5.",
            )),
            "tenant": nullable(described(stored(file, "tenant"), "Whose share of the queue; the caller when absent.")),
            "timeout": nullable(duration(&format!(
                "One attempt's lease, from {} to {}; 60s when absent.",
                humantime::format_duration(MIN_TIMEOUT),
                humantime::format_duration(MAX_TIMEOUT)
            ))),
            "max_attempts": nullable(described(
                {
                    let mut n = stored(file, "max_attempts");
                    n["default"] = json!(DEFAULT_MAX_ATTEMPTS);
                    n
                },
                "Attempts before the task is dead-lettered.",
            )),
            "backoff": nullable(json!({
                "type": "object",
                "description": "The wait after the n-th failure: min(max, initial × multiplier^(n−1)), full jitter. max must not be shorter than initial.",
                "properties": {
                    "initial": nullable(duration("1s when absent.")),
                    "max": nullable(duration("5m when absent.")),
                    "multiplier": nullable(json!({
                        "type": "number",
                        "minimum": BACKOFF_MULTIPLIER.start(),
                        "maximum": BACKOFF_MULTIPLIER.end(),
                        "default": 2,
                    })),
                }
            })),
        }),
        &["capability"],
        "A task for an agent with the capability.",
    )
}

/// `POST /orchestrator/tasks/claim`, `acc.in.task_claim`.
pub fn task_claim() -> Value {
    object(
        json!({
            "capabilities": nullable(json!({
                "type": "array",
                "maxItems": MAX_CAPABILITIES,
                "items": text(MAX_CAPABILITY_LEN),
                "description": "Only tasks for these of the agent's capabilities; all of them when absent.",
            })),
            "max": nullable(json!({
                "type": "integer", "minimum": 1, "maximum": MAX_CLAIM, "default": 1,
                "description": "Most tasks to take.",
            })),
            "wait": nullable(duration(&format!(
                "Long-poll up to this long for a task (0s to {}); 0s when absent. The NATS door answers at once.",
                humantime::format_duration(MAX_CLAIM_WAIT)
            ))),
        }),
        &[],
        "A claim of queued tasks.",
    )
}

/// Every body above by name, for documents that list them as components.
pub fn all() -> Map<String, Value> {
    let mut all = Map::new();
    for (name, schema) in [
        ("Register", register()),
        ("Heartbeat", heartbeat()),
        ("TaskCallback", task_callback()),
        ("Event", event()),
        ("TaskSubmit", task_submit()),
        ("TaskClaim", task_claim()),
    ] {
        all.insert(name.to_owned(), schema);
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::{MAX_KEY_LEN, MAX_TRACE_ID_LEN, MAX_TYPE_LEN};
    use crate::domain::{
        AgentId, AgentProfile, MAX_BASE_URL_LEN, MAX_CONCURRENT_TASKS, MAX_NAME_LEN,
    };
    use crate::tasks::spec::{ClaimSpec, MAX_ATTEMPTS, PRIORITIES, TaskSpec};

    fn field<'a>(schema: &'a Value, path: &[&str]) -> &'a Value {
        path.iter().fold(schema, |v, key| &v[*key])
    }

    /// The stored schemas state the limits the parsers check: change one and this fails.
    #[test]
    fn the_stored_schemas_limits_equal_the_parsers_constants() {
        let registration = stored_schema("registration.json");
        let props = &registration["properties"];
        assert_eq!(props["name"]["maxLength"], MAX_NAME_LEN);
        assert_eq!(props["base_url"]["maxLength"], MAX_BASE_URL_LEN);
        assert_eq!(props["capabilities"]["maxItems"], MAX_CAPABILITIES);
        assert_eq!(
            props["capabilities"]["items"]["maxLength"],
            MAX_CAPABILITY_LEN
        );
        assert_eq!(
            props["max_concurrent_tasks"]["maximum"],
            MAX_CONCURRENT_TASKS
        );
        assert_eq!(registration["$defs"]["id"]["pattern"], id_pattern());
        let submission = stored_schema("task_submission.json");
        let props = &submission["properties"];
        assert_eq!(props["priority"]["minimum"], *PRIORITIES.start());
        assert_eq!(props["priority"]["maximum"], *PRIORITIES.end());
        assert_eq!(props["max_attempts"]["maximum"], MAX_ATTEMPTS);
        assert_eq!(props["capability"]["maxLength"], MAX_CAPABILITY_LEN);
        assert_eq!(
            props["timeout_ms"]["minimum"],
            MIN_TIMEOUT.as_millis() as u64
        );
        assert_eq!(
            field(props, &["backoff", "properties", "multiplier", "maximum"]).as_f64(),
            Some(*BACKOFF_MULTIPLIER.end())
        );
        assert_eq!(submission["$defs"]["id"]["pattern"], id_pattern());
        let event = stored_schema("event.json");
        let props = &event["properties"];
        assert_eq!(
            props["event_id"]["pattern"],
            format!("^[!-~]{{1,{MAX_KEY_LEN}}}$")
        );
        assert_eq!(props["type"]["maxLength"], MAX_TYPE_LEN);
        assert_eq!(props["trace_id"]["maxLength"], MAX_TRACE_ID_LEN);
        let result = stored_schema("task_result.json");
        assert_eq!(
            result["properties"]["trace_id"]["maxLength"],
            MAX_TRACE_ID_LEN
        );
        // The request schemas carry them on.
        assert_eq!(register()["properties"]["name"]["maxLength"], MAX_NAME_LEN);
        assert_eq!(
            field(&task_submit(), &["properties", "priority", "anyOf"])[0]["maximum"],
            *PRIORITIES.end()
        );
        assert_eq!(
            field(&task_claim(), &["properties", "max", "anyOf"])[0]["maximum"],
            MAX_CLAIM
        );
    }

    fn validator(schema: &Value) -> jsonschema::Validator {
        jsonschema::options()
            .should_validate_formats(true)
            .build(schema)
            .unwrap_or_else(|e| panic!("{e}: {schema:#}"))
    }

    /// Each case is accepted by both the schema and the parser, or refused by both.
    fn agree(schema: Value, parse: impl Fn(&Map<String, Value>) -> bool, cases: &[(Value, bool)]) {
        let validator = validator(&schema);
        for (body, valid) in cases {
            assert_eq!(validator.is_valid(body), *valid, "schema on {body}");
            assert_eq!(parse(body.as_object().unwrap()), *valid, "parser on {body}");
        }
    }

    #[test]
    fn a_registration_the_schema_refuses_the_parser_refuses_too() {
        let ok = |extra: Value| {
            let mut body = json!({"agent_id": "a-1", "name": "n", "base_url": "https://x.example", "capabilities": ["c"]});
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            body
        };
        let parse = |body: &Map<String, Value>| {
            body.get("agent_id")
                .and_then(Value::as_str)
                .is_some_and(|id| AgentId::parse(id).is_ok())
                && AgentProfile::parse(body).is_ok()
        };
        agree(
            register(),
            parse,
            &[
                (ok(json!({})), true),
                (
                    ok(
                        json!({"max_concurrent_tasks": MAX_CONCURRENT_TASKS, "dispatch": "push", "push_over": null}),
                    ),
                    true,
                ),
                (
                    ok(json!({"max_concurrent_tasks": MAX_CONCURRENT_TASKS + 1})),
                    false,
                ),
                (ok(json!({"max_concurrent_tasks": 0})), false),
                (ok(json!({"name": " "})), false),
                (ok(json!({"name": "x".repeat(MAX_NAME_LEN + 1)})), false),
                (ok(json!({"agent_id": "a.b"})), false),
                (ok(json!({"base_url": "ftp://x"})), false),
                (ok(json!({"base_url": "https://x y"})), false),
                (
                    ok(json!({"capabilities": vec!["c"; MAX_CAPABILITIES + 1]})),
                    false,
                ),
                (ok(json!({"capabilities": [""]})), false),
                (ok(json!({"dispatch": "later"})), false),
                (
                    json!({"agent_id": "a-1", "name": "n", "base_url": "https://x.example"}),
                    false,
                ),
            ],
        );
    }

    #[test]
    fn a_submission_and_a_claim_the_schema_refuses_the_parser_refuses_too() {
        let caller = AgentId::parse("client").unwrap();
        let submit = |body: &Map<String, Value>| TaskSpec::parse(body, &caller).is_ok();
        let c = |extra: Value| {
            let mut body = json!({"capability": "c"});
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            body
        };
        agree(
            task_submit(),
            submit,
            &[
                (c(json!({})), true),
                (
                    c(
                        json!({"priority": 1, "max_attempts": MAX_ATTEMPTS, "timeout": "90s", "tenant": "t", "task_id": null}),
                    ),
                    true,
                ),
                (
                    c(json!({"backoff": {"initial": "1s", "max": "1h 30m", "multiplier": 10}})),
                    true,
                ),
                (c(json!({"priority": 0})), false),
                (c(json!({"priority": 6})), false),
                (c(json!({"max_attempts": MAX_ATTEMPTS + 1})), false),
                (c(json!({"timeout": "soon"})), false),
                (c(json!({"timeout": 5})), false),
                (c(json!({"tenant": "a b"})), false),
                (c(json!({"task_id": "x".repeat(MAX_ID_LEN + 1)})), false),
                (c(json!({"capability": " "})), false),
                (c(json!({"backoff": {"multiplier": 0.5}})), false),
                (json!({}), false),
            ],
        );
        let claim = |body: &Map<String, Value>| ClaimSpec::parse(body).is_ok();
        agree(
            task_claim(),
            claim,
            &[
                (json!({}), true),
                (
                    json!({"max": MAX_CLAIM, "wait": "30s", "capabilities": ["a"]}),
                    true,
                ),
                (json!({"max": MAX_CLAIM + 1}), false),
                (json!({"max": 0}), false),
                (json!({"wait": "later"}), false),
                (json!({"capabilities": "a"}), false),
                (json!({"capabilities": [" "]}), false),
            ],
        );
    }

    #[test]
    fn an_event_and_a_callback_need_their_required_fields() {
        let events = validator(&event());
        let ok = json!({"event_id": "e-1", "type": "t", "source": "a", "data": null, "time": "2026-01-01T00:00:00Z"});
        assert!(events.is_valid(&ok));
        for missing in ["event_id", "type", "source", "data", "time"] {
            let mut body = ok.clone();
            body.as_object_mut().unwrap().remove(missing);
            assert!(!events.is_valid(&body), "{missing}");
        }
        let mut spaced = ok.clone();
        spaced["event_id"] = json!("a b");
        assert!(!events.is_valid(&spaced));
        let callbacks = validator(&task_callback());
        assert!(callbacks.is_valid(&json!({"status": "succeeded", "result": 1})));
        assert!(
            callbacks.is_valid(
                &json!({"status": "failed", "error": {"message": "m", "retryable": false}})
            )
        );
        assert!(!callbacks.is_valid(&json!({"status": "a b"})));
        assert!(!callbacks.is_valid(&json!({"result": 1})));
    }
}
