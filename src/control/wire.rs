//! The control protocol's messages. One JSON object per line, in both
//! directions:
//!
//! - the server greets: `{"vhost-user-cow": {"version": ..}, "capabilities": ["events"]}`;
//! - a client sends `{"execute": NAME, "arguments": {..}, "id": ANY}`
//!   (`arguments` and `id` optional);
//! - the server answers `{"return": VALUE, "id": ..}` or
//!   `{"error": {"class": CLASS, "desc": TEXT}, "id": ..}`, echoing the id;
//! - a client that executed `subscribe-events` also gets
//!   `{"event": NAME, "data": {..}, "timestamp": {"seconds": S, "microseconds": U}}`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Longest request line accepted; a longer one is answered with an error
/// and the client is disconnected (it cannot be resynchronised).
pub const MAX_LINE: usize = 64 * 1024;

/// The error classes (QMP's names where QMP has one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorClass {
    /// Not JSON, not an object, or not the request's shape.
    InvalidRequest,
    CommandNotFound,
    /// The arguments do not fit the command.
    InvalidParameter,
    /// The command was understood and failed.
    GenericError,
}

/// A failed command, as sent to the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub class: ErrorClass,
    pub desc: String,
}

impl ErrorBody {
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> ErrorBody {
        ErrorBody {
            class,
            desc: desc.into(),
        }
    }
}

/// A request as parsed from a line.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub execute: String,
    pub arguments: Map<String, Value>,
    pub id: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequest {
    execute: String,
    #[serde(default)]
    arguments: Option<Map<String, Value>>,
    #[serde(default)]
    id: Option<Value>,
}

/// Parses one line. On failure the id is still returned when the line was
/// an object with one, so that the error can echo it.
pub fn parse_request(line: &[u8]) -> Result<Request, (Option<Value>, ErrorBody)> {
    let value: Value = serde_json::from_slice(line).map_err(|e| {
        (
            None,
            ErrorBody::new(ErrorClass::InvalidRequest, format!("not JSON: {e}")),
        )
    })?;
    let Value::Object(obj) = value else {
        return Err((
            None,
            ErrorBody::new(
                ErrorClass::InvalidRequest,
                "a request must be a JSON object",
            ),
        ));
    };
    let id = obj.get("id").cloned();
    let raw: RawRequest = serde_json::from_value(Value::Object(obj)).map_err(|e| {
        (
            id.clone(),
            ErrorBody::new(ErrorClass::InvalidRequest, e.to_string()),
        )
    })?;
    Ok(Request {
        execute: raw.execute,
        arguments: raw.arguments.unwrap_or_default(),
        id: raw.id,
    })
}

fn line(mut v: Map<String, Value>, id: Option<Value>) -> Vec<u8> {
    if let Some(id) = id {
        v.insert("id".into(), id);
    }
    let mut out = serde_json::to_vec(&Value::Object(v)).unwrap_or_default();
    out.push(b'\n');
    out
}

/// `{"return": value, "id": id}` and a newline.
pub fn return_line(value: Value, id: Option<Value>) -> Vec<u8> {
    let mut m = Map::new();
    m.insert("return".into(), value);
    line(m, id)
}

/// `{"error": {...}, "id": id}` and a newline.
pub fn error_line(error: &ErrorBody, id: Option<Value>) -> Vec<u8> {
    let mut m = Map::new();
    m.insert(
        "error".into(),
        serde_json::to_value(error).unwrap_or(Value::Null),
    );
    line(m, id)
}

/// The greeting sent when a client connects.
pub fn greeting_line() -> Vec<u8> {
    let mut m = Map::new();
    m.insert(
        "vhost-user-cow".into(),
        serde_json::json!({ "version": env!("CARGO_PKG_VERSION") }),
    );
    m.insert("capabilities".into(), serde_json::json!(["events"]));
    line(m, None)
}

/// An event line with its wall-clock timestamp.
pub fn event_line(name: &str, data: Value, since_epoch: std::time::Duration) -> Vec<u8> {
    let mut m = Map::new();
    m.insert("event".into(), Value::String(name.into()));
    m.insert("data".into(), data);
    m.insert(
        "timestamp".into(),
        serde_json::json!({
            "seconds": since_epoch.as_secs(),
            "microseconds": since_epoch.subsec_micros(),
        }),
    );
    line(m, None)
}

/// What a line from the server is.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage {
    Greeting(Value),
    Return { value: Value, id: Option<Value> },
    Error { error: ErrorBody, id: Option<Value> },
    Event { name: String, data: Value },
}

/// Parses one line from the server (for the client).
pub fn parse_server_line(line: &[u8]) -> Result<ServerMessage, String> {
    let v: Value = serde_json::from_slice(line).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Object(mut obj) = v else {
        return Err("not a JSON object".into());
    };
    let id = obj.remove("id");
    if let Some(value) = obj.remove("return") {
        return Ok(ServerMessage::Return { value, id });
    }
    if let Some(e) = obj.remove("error") {
        let error = serde_json::from_value(e).map_err(|e| format!("bad error object: {e}"))?;
        return Ok(ServerMessage::Error { error, id });
    }
    if let Some(Value::String(name)) = obj.remove("event") {
        let data = obj.remove("data").unwrap_or(Value::Null);
        return Ok(ServerMessage::Event { name, data });
    }
    if obj.contains_key("vhost-user-cow") {
        return Ok(ServerMessage::Greeting(Value::Object(obj)));
    }
    Err("neither a return, an error, an event nor the greeting".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn requests_parse_with_and_without_arguments_and_id() {
        let r = parse_request(br#"{"execute":"query-disk"}"#).unwrap();
        assert_eq!(r.execute, "query-disk");
        assert!(r.arguments.is_empty());
        assert_eq!(r.id, None);
        let r = parse_request(br#"{"execute":"x","arguments":{"a":1},"id":"abc"}"#).unwrap();
        assert_eq!(r.arguments.get("a"), Some(&json!(1)));
        assert_eq!(r.id, Some(json!("abc")));
    }

    #[test]
    fn malformed_requests_are_invalid_and_keep_their_id() {
        for bad in [
            &b"not json"[..],
            b"[1,2]",
            b"\"query-disk\"",
            b"{}",
            b"{\"execute\": 5}",
            b"{\"execute\":\"x\",\"arguments\":[1]}",
            b"{\"execute\":\"x\",\"bogus\":1}",
            b"\xff\xfe",
        ] {
            let (_, e) = parse_request(bad).unwrap_err();
            assert_eq!(e.class, ErrorClass::InvalidRequest, "{bad:?}");
        }
        let (id, _) = parse_request(br#"{"execute":7,"id":42}"#).unwrap_err();
        assert_eq!(id, Some(json!(42)));
    }

    #[test]
    fn answers_round_trip_through_the_client_parser() {
        let l = return_line(json!({"a": 1}), Some(json!(3)));
        assert_eq!(*l.last().unwrap(), b'\n');
        assert_eq!(
            parse_server_line(&l).unwrap(),
            ServerMessage::Return {
                value: json!({"a": 1}),
                id: Some(json!(3))
            }
        );
        let e = ErrorBody::new(ErrorClass::CommandNotFound, "no such command: x");
        assert_eq!(
            parse_server_line(&error_line(&e, None)).unwrap(),
            ServerMessage::Error { error: e, id: None }
        );
        let ev = event_line("x", json!({"b": 2}), std::time::Duration::from_millis(1500));
        assert_eq!(
            parse_server_line(&ev).unwrap(),
            ServerMessage::Event {
                name: "x".into(),
                data: json!({"b": 2})
            }
        );
        assert!(matches!(
            parse_server_line(&greeting_line()).unwrap(),
            ServerMessage::Greeting(_)
        ));
        assert!(parse_server_line(b"{\"what\":1}").is_err());
    }
}
