//! The AsyncAPI 3.0 document of the NATS interface, generated from `subjects/catalog.json`: one
//! channel per subject (its address with `{parameters}` for the wildcard tokens), one message
//! per channel with the subject's JSON Schema as payload, and the headers as message traits. The
//! inbound subjects (`acc.in.*`) carry the request bodies of [`crate::bodies`], the
//! same schemas the OpenAPI document gives the HTTP door.
//!
//! Operations are the bridge's own: it `receive`s what agents publish on `acc.in.*` and the
//! dispatcher's requests, and `send`s everything else. The document is committed as
//! `docs/asyncapi.json`; a test fails when it and the catalog disagree (regenerate with
//! `UPDATE_ASYNCAPI=1 cargo nextest run -E 'test(/^asyncapi::/)'`).

use serde_json::{Map, Value, json};

use crate::bodies;

/// The request body an inbound subject carries, by subject (a component of [`bodies::all`]).
pub const INBOUND_BODIES: [(&str, &str); 6] = [
    ("acc.in.register", "Register"),
    ("acc.in.heartbeat", "Heartbeat"),
    ("acc.in.task_result.*", "TaskCallback"),
    ("acc.in.event", "Event"),
    ("acc.in.task_submit", "TaskSubmit"),
    ("acc.in.task_claim", "TaskClaim"),
];

/// `acc.agents.registered.*` → `accAgentsRegistered`, `acc.dead_letter.>` → `accDeadLetter`.
fn channel_id(subject: &str) -> String {
    let mut id = String::new();
    for (i, word) in subject
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .enumerate()
    {
        let mut chars = word.chars();
        if let Some(first) = chars.next() {
            if i == 0 {
                id.push(first);
            } else {
                id.push(first.to_ascii_uppercase());
            }
            id.extend(chars);
        }
    }
    id
}

/// The parameter names of a subject's wildcard tokens, from its description when it spells the
/// subject out (`acc.events.<agent_id>: ...`), else `token1`, `token2`… (`rest` for `>`).
fn parameter_names(subject: &str, description: &str) -> Vec<String> {
    let spelled: Vec<&str> = description
        .split_whitespace()
        .next()
        .unwrap_or("")
        .trim_end_matches(':')
        .split('.')
        .collect();
    let tokens: Vec<&str> = subject.split('.').collect();
    let mut names = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        if *token != "*" && *token != ">" {
            continue;
        }
        let named = spelled
            .get(i)
            .and_then(|t| t.strip_prefix('<')?.strip_suffix('>'))
            .filter(|t| t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
            .filter(|_| spelled.len() == tokens.len());
        names.push(match (named, *token) {
            (Some(name), _) => name.to_owned(),
            (None, ">") => "rest".to_owned(),
            (None, _) => format!("token{}", names.len() + 1),
        });
    }
    names
}

/// `acc.events.*` with `[agent_id]` → `acc.events.{agent_id}`.
fn address(subject: &str, names: &[String]) -> String {
    let mut names = names.iter();
    subject
        .split('.')
        .map(|token| match token {
            "*" | ">" => format!("{{{}}}", names.next().expect("one name per wildcard")),
            literal => literal.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// The headers an agent's message on `acc.in.*` may carry.
fn inbound_headers() -> Value {
    json!({
        "type": "object",
        "required": ["Authorization"],
        "properties": {
            "Authorization": {
                "type": "string", "pattern": "^Bearer \\S+$",
                "description": "The caller's token (HS256 JWT, or an opaque token under AUTH_MODE introspection): the same as over HTTP. Never stored: a refusal on acc.rejected.* keeps the body, not the header."
            },
            "Acc-Reply-To": {
                "type": "string", "pattern": "^acc\\.reply\\.[A-Za-z0-9_-]+\\.[^\\s*>]+$",
                "description": "Where the door answers: a subject under acc.reply.<the token's agent_id>. The answer carries the HTTP-equivalent status in Acc-Status and the HTTP answer body as payload."
            },
            "Idempotency-Key": {
                "type": "string", "pattern": "^[!-~]{1,128}$",
                "description": "As over HTTP: 1 to 128 visible ASCII characters."
            },
            "Nats-Msg-Id": {
                "type": "string", "minLength": 1,
                "description": "Dedupe id: the door's intake stores the message in ACC_INBOUND with it scoped to the token's agent (a retry within DUPLICATE_WINDOW is acked duplicate; no other agent can pre-empt it)."
            },
            "traceparent": traceparent(),
        }
    })
}

fn traceparent() -> Value {
    json!({
        "type": "string",
        "pattern": "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
        "description": "W3C Trace Context: the message's trace, continued by every consumer."
    })
}

/// Headers of what the bridge stores: the dedupe id and the trace context.
fn stored_headers() -> Value {
    json!({
        "type": "object",
        "properties": {
            "Nats-Msg-Id": {
                "type": "string", "minLength": 1,
                "description": "The dedupe id the bridge derived (a client's retry is stored once)."
            },
            "traceparent": traceparent(),
            "tracestate": {"type": "string", "description": "W3C Trace Context vendor state, when the trace had one."},
        }
    })
}

/// The extra headers a subject's messages carry, named in the catalog's description
/// (`Acc-Dead-Letter-Reason`, `Acc-Rejected-Code` ...).
fn described_headers(description: &str) -> Map<String, Value> {
    let mut headers = Map::new();
    for word in description.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')) {
        if word.starts_with("Acc-") && word.len() > 4 && !headers.contains_key(word) {
            headers.insert(word.to_owned(), json!({"type": "string"}));
        }
    }
    headers
}

/// A stored schema as a standalone component: `$defs` inlined, `$schema`, `$id` dropped.
fn component(mut schema: Value) -> Value {
    let root = schema.clone();
    bodies::inline_refs(&mut schema, &root);
    if let Value::Object(map) = &mut schema {
        map.remove("$defs");
        map.remove("$schema");
        map.remove("$id");
    }
    schema
}

/// `registration.json` → `Registration`.
fn schema_name(file: &str) -> String {
    file.trim_end_matches(".json")
        .split('_')
        .map(|w| {
            let mut chars = w.chars();
            chars.next().map_or(String::new(), |c| {
                c.to_ascii_uppercase().to_string() + chars.as_str()
            })
        })
        .collect()
}

/// The document, from the catalog (`subjects/catalog.json`) and `schema`, which reads a file of
/// `subjects/schemas/` by name.
pub fn document(catalog: &Value, schema: impl Fn(&str) -> Value) -> Value {
    let mut channels = Map::new();
    let mut operations = Map::new();
    let mut messages = Map::new();
    let mut schemas = bodies::all();
    let entries = catalog["subjects"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| (e, "subject"))
        .chain(
            catalog["requests"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| (e, "request")),
        );
    for (entry, kind) in entries {
        let subject = entry["subject"].as_str().unwrap_or_default();
        let description = entry["description"].as_str().unwrap_or_default();
        let id = channel_id(subject);
        let names = parameter_names(subject, description);
        let inbound = subject.starts_with("acc.in.");
        let payload = if inbound {
            let body = INBOUND_BODIES
                .iter()
                .find(|(s, _)| *s == subject)
                .map(|(_, body)| *body)
                .unwrap_or_else(|| panic!("{subject}: name its request body in INBOUND_BODIES"));
            json!({"$ref": format!("#/components/schemas/{body}")})
        } else if let Some(file) = entry["schema"].as_str() {
            let name = schema_name(file);
            schemas
                .entry(name.clone())
                .or_insert_with(|| component(schema(file)));
            json!({"$ref": format!("#/components/schemas/{name}")})
        } else {
            json!({"description": "The original bytes, unchanged (no schema)."})
        };
        let mut traits = vec![json!({"$ref": if inbound {
            "#/components/messageTraits/inbound"
        } else {
            "#/components/messageTraits/stored"
        }})];
        let extra = described_headers(description);
        let mut message = json!({
            "name": id,
            "title": subject,
            "summary": description.split(". ").next().unwrap_or(description),
            "description": description,
            "contentType": "application/json",
            "payload": payload,
        });
        if !extra.is_empty() && !inbound {
            message["headers"] = json!({"type": "object", "properties": extra});
        }
        if kind == "request" {
            // Core NATS request/reply between bridge roles: no stored headers.
            traits.clear();
        }
        if !traits.is_empty() {
            message["traits"] = traits.into();
        }
        messages.insert(id.clone(), message);
        let mut channel = json!({
            "address": address(subject, &names),
            "description": description,
            "messages": {(id.clone()): {"$ref": format!("#/components/messages/{id}")}},
        });
        if let Some(stream) = entry["stream"].as_str() {
            channel["x-jetstream-stream"] = json!(stream);
        }
        if !names.is_empty() {
            let parameters: Map<String, Value> = names
                .iter()
                .map(|n| {
                    (
                        n.clone(),
                        json!({"description": format!("The subject token {n}.")}),
                    )
                })
                .collect();
            channel["parameters"] = parameters.into();
        }
        channels.insert(id.clone(), channel);
        let receives = inbound || kind == "request";
        operations.insert(
            format!(
                "{}{}",
                if receives { "receive" } else { "send" },
                upper_first(&id)
            ),
            json!({
                "action": if receives { "receive" } else { "send" },
                "channel": {"$ref": format!("#/channels/{id}")},
                "messages": [{"$ref": format!("#/channels/{id}/messages/{id}")}],
            }),
        );
    }
    if let Some(reply) = catalog.get("reply_namespace") {
        let subject = reply["subject"].as_str().unwrap_or_default();
        let id = "accReply".to_owned();
        messages.insert(
            id.clone(),
            json!({
                "name": id,
                "title": subject,
                "description": reply["description"],
                "contentType": "application/json",
                "headers": {"type": "object", "properties": {"Acc-Status": {
                    "type": "string", "pattern": "^[1-5][0-9]{2}$",
                    "description": "The status the HTTP door would have answered."
                }}},
                "payload": {"description": "The body the HTTP door would have answered: its success body, or the error envelope."},
            }),
        );
        channels.insert(
            id.clone(),
            json!({
                "address": "acc.reply.{agent_id}.{rest}",
                "description": reply["description"],
                "parameters": {
                    "agent_id": {"description": "The agent whose namespace it is."},
                    "rest": {"description": "Anything the agent chose (its Acc-Reply-To)."}
                },
                "messages": {(id.clone()): {"$ref": format!("#/components/messages/{id}")}},
            }),
        );
        operations.insert(
            "sendAccReply".into(),
            json!({
                "action": "send",
                "channel": {"$ref": format!("#/channels/{id}")},
                "messages": [{"$ref": format!("#/channels/{id}/messages/{id}")}],
            }),
        );
    }
    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "auto-com-center",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The NATS side of the message-bus bridge: what agents publish (acc.in.*, admitted by the NATS door with the same admission as HTTP), what the bridge stores on JetStream, and the dispatcher's core request/reply subjects. Generated from subjects/catalog.json.",
        },
        "defaultContentType": "application/json",
        "servers": {
            "local": {
                "host": "localhost:4222",
                "protocol": "nats",
                "description": "The embedded nats-server, or docker-compose's (agents connect as their own NATS user; docs/nats.md)."
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": schemas,
            "messages": messages,
            "messageTraits": {
                "inbound": {"headers": inbound_headers()},
                "stored": {"headers": stored_headers()},
            },
        },
    })
}

fn upper_first(s: &str) -> String {
    let mut chars = s.chars();
    chars.next().map_or(String::new(), |c| {
        c.to_ascii_uppercase().to_string() + chars.as_str()
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn root() -> &'static Path {
        Path::new(env!("CARGO_MANIFEST_DIR"))
    }

    fn generated() -> Value {
        let catalog: Value = serde_json::from_str(
            &std::fs::read_to_string(root().join("subjects/catalog.json")).unwrap(),
        )
        .unwrap();
        document(&catalog, |file| {
            let path = root().join("subjects/schemas").join(file);
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
    }

    /// Every `$ref` in `value`, with where it is.
    fn refs(value: &Value, at: String, out: &mut Vec<(String, String)>) {
        match value {
            Value::Object(map) => {
                for (key, v) in map {
                    if key == "$ref" {
                        out.push((at.clone(), v.as_str().unwrap_or_default().to_owned()));
                    } else {
                        refs(v, format!("{at}/{key}"), out);
                    }
                }
            }
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    refs(v, format!("{at}/{i}"), out);
                }
            }
            _ => {}
        }
    }

    #[test]
    fn the_committed_asyncapi_document_equals_the_generated_one() {
        let document = generated();
        let committed = root().join("docs/asyncapi.json");
        let text = serde_json::to_string_pretty(&document).unwrap() + "\n";
        if std::env::var_os("UPDATE_ASYNCAPI").is_some() {
            std::fs::write(&committed, &text).unwrap();
        }
        let on_disk: Value = serde_json::from_str(
            &std::fs::read_to_string(&committed).expect("docs/asyncapi.json exists"),
        )
        .unwrap();
        assert!(
            on_disk == document,
            "docs/asyncapi.json is out of date: regenerate it with \
             UPDATE_ASYNCAPI=1 cargo nextest run -E 'test(/^asyncapi::/)'"
        );
    }

    #[test]
    fn the_document_has_the_asyncapi_3_shape_and_every_ref_resolves() {
        let document = generated();
        assert_eq!(document["asyncapi"], "3.0.0");
        assert!(document["info"]["title"].is_string() && document["info"]["version"].is_string());
        let channels = document["channels"].as_object().unwrap();
        for (id, channel) in channels {
            let address = channel["address"].as_str().unwrap();
            assert!(
                !address.contains('*') && !address.contains('>'),
                "{id}: {address}"
            );
            // Every {parameter} of the address is declared, and nothing else.
            let params: Vec<&str> = address
                .split('.')
                .filter_map(|t| t.strip_prefix('{')?.strip_suffix('}'))
                .collect();
            let declared: Vec<&str> = channel["parameters"]
                .as_object()
                .map(|p| p.keys().map(String::as_str).collect())
                .unwrap_or_default();
            assert_eq!(params, declared, "{id}");
            assert!(!channel["messages"].as_object().unwrap().is_empty(), "{id}");
        }
        for (id, operation) in document["operations"].as_object().unwrap() {
            let action = operation["action"].as_str().unwrap();
            assert!(action == "send" || action == "receive", "{id}: {action}");
            assert!(operation["channel"]["$ref"].is_string(), "{id}");
        }
        let mut found = Vec::new();
        refs(&document, String::new(), &mut found);
        assert!(found.len() > 50, "{} refs", found.len());
        for (at, target) in found {
            let pointer = target
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("{at}: {target} is not local"));
            assert!(
                document.pointer(pointer).is_some(),
                "{at}: {target} does not resolve"
            );
        }
        // Message traits carry the headers as schemas, and the inbound one requires the token.
        let inbound = &document["components"]["messageTraits"]["inbound"]["headers"];
        assert_eq!(inbound["required"], json!(["Authorization"]));
        for header in [
            "Acc-Reply-To",
            "Idempotency-Key",
            "Nats-Msg-Id",
            "traceparent",
        ] {
            assert!(inbound["properties"][header].is_object(), "{header}");
        }
    }

    #[test]
    fn every_catalog_subject_is_a_channel_with_its_schema() {
        let document = generated();
        let catalog: Value = serde_json::from_str(
            &std::fs::read_to_string(root().join("subjects/catalog.json")).unwrap(),
        )
        .unwrap();
        let channels = document["channels"].as_object().unwrap();
        let messages = &document["components"]["messages"];
        for entry in catalog["subjects"]
            .as_array()
            .unwrap()
            .iter()
            .chain(catalog["requests"].as_array().unwrap())
        {
            let subject = entry["subject"].as_str().unwrap();
            let (id, channel) = channels
                .iter()
                .find(|(_, c)| {
                    // The address with its parameters back as wildcards is the subject.
                    let address = c["address"].as_str().unwrap();
                    let wild: Vec<&str> = address
                        .split('.')
                        .zip(subject.split('.'))
                        .map(|(a, s)| if a.starts_with('{') { s } else { a })
                        .collect();
                    wild.join(".") == subject
                        && address.split('.').count() == subject.split('.').count()
                })
                .unwrap_or_else(|| panic!("{subject} has no channel"));
            let payload = &messages[id]["payload"];
            match (entry["schema"].as_str(), subject.starts_with("acc.in.")) {
                (_, true) => assert!(
                    payload["$ref"]
                        .as_str()
                        .is_some_and(|r| r.starts_with("#/components/schemas/")),
                    "{subject}: an inbound subject carries its request body"
                ),
                (Some(file), false) => {
                    assert_eq!(
                        payload["$ref"],
                        format!("#/components/schemas/{}", schema_name(file)),
                        "{subject}"
                    );
                }
                (None, false) => assert!(payload.get("$ref").is_none(), "{subject}"),
            }
            assert_eq!(channel["x-jetstream-stream"], entry["stream"], "{subject}");
        }
        assert_eq!(
            channels["accEvents"]["address"], "acc.events.{agent_id}",
            "parameters are named from the catalog"
        );
    }
}
