//! Value parsers of the command line: each turns the text of one flag (or its environment
//! variable) into a typed value, or into a one-line reason that
//! [`ConfigError::from_clap`](super::ConfigError::from_clap) prefixes with the setting's name.
//! Durations are [`domain::parse_duration`](crate::domain::parse_duration), used as is.
//!
//! Lists are comma-separated; blanks around entries and empty entries are ignored, repeats are
//! kept once.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::net::SocketAddr;
use std::str::FromStr;

use clap::ValueEnum as _;

use super::Role;
use crate::domain::{AgentId, AgentProfile};

/// The entries of a comma-separated list, trimmed, without empty ones.
fn entries(raw: &str) -> impl Iterator<Item = &str> {
    raw.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// Pushes `item` unless the list already holds it.
fn push_once<T: PartialEq>(list: &mut Vec<T>, item: T) {
    if !list.contains(&item) {
        list.push(item);
    }
}

/// A whole number, with the reason it is not one.
fn whole<T: FromStr>(raw: &str) -> Result<T, String>
where
    T::Err: Display,
{
    raw.trim()
        .parse()
        .map_err(|e| format!("{raw:?} is not a whole number ({e})"))
}

/// A whole number of at least `min`.
pub fn at_least<T>(min: T) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
where
    T: FromStr + PartialOrd + Display + Copy + Send + Sync + 'static,
    T::Err: Display,
{
    move |raw| match whole(raw)? {
        n if n >= min => Ok(n),
        _ => Err(format!("must be at least {min}")),
    }
}

/// A whole number from `min` to `max`, both included.
pub fn between<T>(
    min: T,
    max: T,
) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
where
    T: FromStr + PartialOrd + Display + Copy + Send + Sync + 'static,
    T::Err: Display,
{
    move |raw| match whole(raw)? {
        n if (min..=max).contains(&n) => Ok(n),
        n => Err(format!("must be between {min} and {max}, got {n}")),
    }
}

/// `262144`, `256KiB`, `1MiB`, `1GiB` (also `KB`/`MB`/`GB`, read as powers of 1024); not zero.
pub fn byte_size(raw: &str) -> Result<usize, String> {
    let raw = raw.trim();
    let not_a_size = || format!("{raw:?} is not a size like 262144, 256KiB or 1GiB");
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (digits, unit) = raw.split_at(split);
    let multiplier: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(not_a_size()),
    };
    let number = digits.parse::<usize>().map_err(|_| not_a_size())?;
    number
        .checked_mul(multiplier)
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{raw:?} is out of range"))
}

/// An address to listen on, like `127.0.0.1:8080`.
pub fn socket_addr(raw: &str) -> Result<SocketAddr, String> {
    raw.parse()
        .map_err(|e| format!("{raw:?} is not an address like 127.0.0.1:8080 ({e})"))
}

/// Requests per second, `0` for no limit.
pub fn rate(raw: &str) -> Result<f64, String> {
    match raw.trim().parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate >= 0.0 => Ok(rate),
        _ => Err("must be a number of requests per second, 0 to disable".into()),
    }
}

/// A log filter in `tracing`'s `EnvFilter` syntax, checked and kept as text.
pub fn log_filter(raw: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::try_new(raw)
        .map(|_| raw.to_owned())
        .map_err(|e| e.to_string())
}

/// A list of roles; at least one.
pub fn roles(raw: &str) -> Result<Vec<Role>, String> {
    let mut roles = Vec::new();
    for name in entries(raw) {
        let role = Role::from_str(name, true).map_err(|_| {
            format!(
                "unknown role {name:?}; known roles: ingress, registry, door, metrics, alerting, dispatcher"
            )
        })?;
        push_once(&mut roles, role);
    }
    if roles.is_empty() {
        return Err("name at least one role".into());
    }
    Ok(roles)
}

/// A list of agent ids, each safe as a subject token and NATS user name; may be empty.
pub fn agent_ids(raw: &str) -> Result<Vec<AgentId>, String> {
    let mut agents = Vec::new();
    for id in entries(raw) {
        push_once(
            &mut agents,
            AgentId::parse(id).map_err(|e| format!("{id:?}: {e}"))?,
        );
    }
    Ok(agents)
}

/// A list of http(s) URLs (webhooks); may be empty. Errors never print the URL: webhook paths
/// and queries often carry tokens, so they name the entry by position (and, when it parses, by
/// scheme, host and port only).
pub fn webhook_urls(raw: &str) -> Result<Vec<url::Url>, String> {
    let mut urls = Vec::new();
    for (index, item) in entries(raw).enumerate() {
        let n = index + 1;
        let url = url::Url::parse(item).map_err(|e| format!("entry {n} is not a URL ({e})"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "entry {n} ({}): scheme must be http or https",
                crate::alerting::routes::redacted(&url)
            ));
        }
        urls.push(url);
    }
    Ok(urls)
}

/// `PUSH_ALLOWED_URLS`: URL prefixes, each starting with `http://` or `https://`. Blank text is
/// the empty list (push refused to every URL).
pub fn url_prefixes(raw: &str) -> Result<Vec<String>, String> {
    let mut prefixes = Vec::new();
    for (index, item) in entries(raw).enumerate() {
        let n = index + 1;
        let rest = item
            .strip_prefix("http://")
            .or_else(|| item.strip_prefix("https://"))
            .ok_or_else(|| format!("entry {n} ({item:?}) must start with http:// or https://"))?;
        if rest.is_empty() {
            return Err(format!("entry {n} ({item:?}) names no host"));
        }
        prefixes.push(item.to_owned());
    }
    Ok(prefixes)
}

/// A list of Alertmanager base URLs, each turned into its alerts endpoint (`/api/v2/alerts`);
/// may be empty. Checked and shown like webhook URLs.
pub fn alertmanager_urls(raw: &str) -> Result<Vec<url::Url>, String> {
    Ok(webhook_urls(raw)?
        .iter()
        .map(crate::alerting::alertmanager::alerts_endpoint)
        .collect())
}

/// A list of NATS server URLs; `nats://` is added where no scheme is given. Blank text is the
/// empty list (the embedded server); text with commas but no entry is refused.
pub fn nats_urls(raw: &str) -> Result<Vec<String>, String> {
    if raw.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut urls = Vec::new();
    for item in entries(raw) {
        let with_scheme = if item.contains("://") {
            item.to_owned()
        } else {
            format!("nats://{item}")
        };
        let parsed =
            url::Url::parse(&with_scheme).map_err(|e| format!("{item:?} is not a URL ({e})"))?;
        if !matches!(parsed.scheme(), "nats" | "tls" | "ws" | "wss") {
            return Err(format!("{item:?}: scheme must be nats, tls, ws or wss"));
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(format!("{item:?} has no host"));
        }
        urls.push(with_scheme);
    }
    if urls.is_empty() {
        return Err("no URL given".into());
    }
    Ok(urls)
}

/// Pre-registered agents, JSON: `{"agent_id": {"name", "base_url", "capabilities": []}}`; blank
/// text is none.
pub fn registered_agents(raw: &str) -> Result<BTreeMap<AgentId, AgentProfile>, String> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Ok(BTreeMap::new());
    }
    let value: serde_json::Value =
        serde_json::from_str(raw).map_err(|e| format!("not valid JSON: {e}"))?;
    let serde_json::Value::Object(map) = value else {
        return Err("must be a JSON object {agent_id: {name, base_url, capabilities}}".into());
    };
    let mut agents = BTreeMap::new();
    for (id, profile) in map {
        let agent_id = AgentId::parse(&id).map_err(|e| format!("agent id {id:?}: {e}"))?;
        let serde_json::Value::Object(fields) = profile else {
            return Err(format!(
                "agent {id:?}: expected an object with name, base_url, capabilities"
            ));
        };
        let profile = AgentProfile::parse(&fields).map_err(|e| format!("agent {id:?}: {e}"))?;
        agents.insert(agent_id, profile);
    }
    Ok(agents)
}

/// A duration where zero means "off": `0`, `0s`, or any positive duration.
pub fn duration_or_zero(raw: &str) -> Result<std::time::Duration, crate::domain::DurationError> {
    match crate::domain::parse_duration(raw) {
        Err(crate::domain::DurationError::Zero) => Ok(std::time::Duration::ZERO),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_webhook_url_is_refused_without_printing_its_credentials() {
        for raw in [
            "ftp://user:hunter2@hooks.example.com/services/T0/B0/secret?token=abc",
            "https://ok.example.com/hook, hooks.example.com/services/secret?token=abc",
        ] {
            let shown = webhook_urls(raw).unwrap_err();
            for secret in ["hunter2", "user", "secret", "token", "abc", "services"] {
                assert!(!shown.contains(secret), "{secret} leaked in {shown:?}");
            }
        }
        let shown = webhook_urls("ftp://user:pw@hooks.example.com/x").unwrap_err();
        assert!(shown.contains("ftp://hooks.example.com/"), "{shown}");
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(byte_size("256KiB").unwrap(), 262_144);
        assert_eq!(byte_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(byte_size("1000").unwrap(), 1000);
        assert!(byte_size("0").is_err());
        assert!(byte_size("lots").is_err());
    }

    #[test]
    fn numbers_are_bounded() {
        assert_eq!(at_least(1u32)("3"), Ok(3));
        assert_eq!(at_least(1u32)("0"), Err("must be at least 1".into()));
        assert_eq!(between(1usize, 5)("5"), Ok(5));
        assert_eq!(
            between(1usize, 5)("7"),
            Err("must be between 1 and 5, got 7".into())
        );
        assert!(at_least(1u32)("-1").is_err());
    }

    #[test]
    fn lists_skip_blanks_and_repeats() {
        assert_eq!(
            roles(" ingress, ,door,ingress").unwrap(),
            [Role::Ingress, Role::Door]
        );
        assert!(roles(" , ").is_err());
        assert_eq!(agent_ids("").unwrap(), []);
        assert_eq!(nats_urls("  ").unwrap(), Vec::<String>::new());
        assert!(nats_urls(",").is_err());
    }
}
