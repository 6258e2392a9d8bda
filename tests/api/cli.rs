//! The command line: `--help` shows every setting, bad settings are refused with one line that
//! names the setting, and `token` prints a JWT the service accepts.

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use crate::helpers::*;

/// A command that is expected to exit at once.
const QUICK: Duration = Duration::from_secs(10);

#[test]
fn help_lists_every_setting_with_its_env_var() {
    let secret_value = "help-must-not-show-this-secret-0123456789";
    let password_value = "help-must-not-show-this-password";
    let names = setting_env_vars();
    assert!(names.len() > 10, "scanned settings: {names:?}");

    let serve = run_to_end(
        binary()
            .args(["serve", "--help"])
            .env("SHARED_SECRET", secret_value)
            .env("NATS_PASSWORD", password_value),
        QUICK,
    );
    assert!(serve.status.success(), "{serve:?}");
    let missing: Vec<&String> = names
        .iter()
        .filter(|name| !serve.stdout.contains(name.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "`serve --help` does not show {missing:?}:\n{}",
        serve.stdout
    );

    let token = run_to_end(
        binary()
            .args(["token", "--help"])
            .env("SHARED_SECRET", secret_value),
        QUICK,
    );
    assert!(token.status.success(), "{token:?}");
    assert!(token.stdout.contains("SHARED_SECRET"), "{}", token.stdout);

    for run in [&serve, &token] {
        for value in [secret_value, password_value] {
            assert!(
                !run.stdout.contains(value) && !run.stderr.contains(value),
                "help printed a secret value:\n{}{}",
                run.stdout,
                run.stderr
            );
        }
    }
}

#[test]
fn serve_refuses_bad_settings_with_one_line_naming_the_setting() {
    let data = tempfile::tempdir().unwrap();
    let short_secret = "short-secret-value";
    // (what is wrong, variable to set or remove, value (None removes it), setting named)
    let cases: &[(&str, &str, Option<&str>, &str)] = &[
        ("missing secret", "SHARED_SECRET", None, "SHARED_SECRET"),
        (
            "short secret",
            "SHARED_SECRET",
            Some(short_secret),
            "SHARED_SECRET",
        ),
        (
            "agents not JSON",
            "REGISTERED_AGENTS",
            Some("{bad"),
            "REGISTERED_AGENTS",
        ),
        (
            "address not an address",
            "HTTP_ADDR",
            Some("nonsense"),
            "HTTP_ADDR",
        ),
        (
            "duration not a duration",
            "AGENT_STALE_AFTER",
            Some("soon"),
            "AGENT_STALE_AFTER",
        ),
    ];
    for (what, variable, value, setting) in cases {
        let mut command = binary();
        // Everything else valid; were the bad value accepted, start-up would fail fast on the
        // missing nats-server binary instead of serving.
        command
            .arg("serve")
            .env("SHARED_SECRET", SECRET)
            .env("HTTP_ADDR", "127.0.0.1:0")
            .env("DATA_DIR", data.path())
            .env("EMBEDDED_NATS_PORT", "0")
            .env("NATS_SERVER_BIN", "/nonexistent/nats-server");
        match value {
            Some(value) => command.env(variable, value),
            None => command.env_remove(variable),
        };
        let run = run_to_end(&mut command, QUICK);
        assert_eq!(run.status.code(), Some(2), "{what}: {run:?}");
        let lines: Vec<&str> = run.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{what}: stderr is not one line: {run:?}");
        assert!(
            lines[0].contains(setting),
            "{what}: stderr does not name {setting}: {:?}",
            lines[0]
        );
        assert!(
            !run.stderr.contains(short_secret) && !run.stderr.contains(SECRET),
            "{what}: stderr shows the secret: {:?}",
            run.stderr
        );
        assert!(run.stdout.is_empty(), "{what}: {run:?}");
    }
}

#[test]
fn token_prints_a_verifiable_jwt() {
    let run = run_to_end(
        binary()
            .args(["token", "--agent-id", "a1"])
            .args(["--scope", "orchestrator.admin", "--ttl", "60"])
            .env("SHARED_SECRET", SECRET),
        QUICK,
    );
    assert!(run.status.success(), "{run:?}");
    let jwt = run.stdout.trim();
    assert_eq!(jwt.lines().count(), 1, "{run:?}");
    assert_eq!(jwt.split('.').count(), 3, "not a JWT: {jwt:?}");

    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_audience(&["auto-com-center"]);
    validation.set_required_spec_claims(&["exp", "aud"]);
    let decoded = jsonwebtoken::decode::<Value>(
        jwt,
        &DecodingKey::from_secret(SECRET.as_bytes()),
        &validation,
    )
    .expect("the token verifies with the shared secret");
    assert_eq!(decoded.header.alg, Algorithm::HS256);
    let claims = decoded.claims;
    assert_eq!(claims["agent_id"], "a1", "{claims}");
    assert_eq!(claims["scope"], "orchestrator.admin", "{claims}");
    assert_eq!(claims["aud"], "auto-com-center", "{claims}");
    let exp = claims["exp"].as_u64().expect("exp");
    let iat = claims["iat"].as_u64().expect("iat");
    assert_eq!(exp - iat, 60, "{claims}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(iat.abs_diff(now) <= 5, "iat {iat} is not now ({now})");

    let other_secret = DecodingKey::from_secret(b"another-secret-0123456789-0123456789");
    assert!(
        jsonwebtoken::decode::<Value>(jwt, &other_secret, &validation).is_err(),
        "the token verifies with a secret it was not signed with"
    );

    let no_secret = run_to_end(binary().args(["token", "--agent-id", "a1"]), QUICK);
    assert_eq!(no_secret.status.code(), Some(2), "{no_secret:?}");
    assert!(no_secret.stderr.contains("SHARED_SECRET"), "{no_secret:?}");
    assert!(no_secret.stdout.is_empty(), "{no_secret:?}");

    let bad_id = run_to_end(
        binary()
            .args(["token", "--agent-id", "a.b"])
            .env("SHARED_SECRET", SECRET),
        QUICK,
    );
    assert_eq!(bad_id.status.code(), Some(2), "{bad_id:?}");
    assert!(bad_id.stderr.contains("agent-id"), "{bad_id:?}");
    assert!(
        bad_id.stdout.is_empty(),
        "no token for a bad id: {bad_id:?}"
    );
}

#[test]
fn token_refuses_a_ttl_longer_than_the_maximum_lifetime() {
    let too_long = run_to_end(
        binary()
            .args(["token", "--agent-id", "a1", "--ttl", "25h"])
            .env("SHARED_SECRET", SECRET),
        QUICK,
    );
    assert_eq!(too_long.status.code(), Some(2), "{too_long:?}");
    assert!(
        too_long.stderr.contains("MAX_TOKEN_LIFETIME"),
        "{too_long:?}"
    );
    assert!(too_long.stdout.is_empty(), "{too_long:?}");
    let allowed = run_to_end(
        binary()
            .args(["token", "--agent-id", "a1", "--ttl", "25h"])
            .env("SHARED_SECRET", SECRET)
            .env("MAX_TOKEN_LIFETIME", "48h"),
        QUICK,
    );
    assert!(allowed.status.success(), "{allowed:?}");
}
