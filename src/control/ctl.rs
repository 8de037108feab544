//! What `vhost-user-cow ctl` prints: an answer as readable indented
//! `key: value` lines (or the JSON itself), and arguments given as
//! `key=value` words.

use serde_json::{Map, Value};

/// `key=value` words as a JSON object; a value that parses as JSON
/// (numbers, booleans, null, quoted strings, objects) is taken as such,
/// anything else as a string.
pub fn parse_arguments(words: &[String]) -> Result<Map<String, Value>, String> {
    let mut m = Map::new();
    for w in words {
        let (k, v) = w
            .split_once('=')
            .ok_or_else(|| format!("argument {w:?} is not key=value"))?;
        if k.is_empty() {
            return Err(format!("argument {w:?} has no key"));
        }
        let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_owned()));
        if m.insert(k.to_owned(), value).is_some() {
            return Err(format!("argument {k:?} given twice"));
        }
    }
    Ok(m)
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::Null => Some("-".into()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) => Some(s.clone()),
        Value::Array(a) if a.is_empty() => Some("none".into()),
        Value::Array(a) if a.iter().all(|x| !x.is_object() && !x.is_array()) => {
            Some(a.iter().filter_map(scalar).collect::<Vec<_>>().join(", "))
        }
        _ => None,
    }
}

fn write_value(out: &mut String, v: &Value, indent: usize) {
    let pad = "  ".repeat(indent);
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match scalar(v) {
                    Some(s) => out.push_str(&format!("{pad}{k}: {s}\n")),
                    None => {
                        out.push_str(&format!("{pad}{k}:\n"));
                        write_value(out, v, indent + 1);
                    }
                }
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                match scalar(v) {
                    Some(s) => out.push_str(&format!("{pad}- {s}\n")),
                    None => {
                        out.push_str(&format!("{pad}[{i}]\n"));
                        write_value(out, v, indent + 1);
                    }
                }
            }
        }
        other => out.push_str(&format!("{pad}{}\n", scalar(other).unwrap_or_default())),
    }
}

/// The readable form of an answer. `query-commands` is a table.
pub fn readable(command: &str, v: &Value) -> String {
    if command == "query-commands" {
        if let Value::Array(list) = v {
            let width = list
                .iter()
                .filter_map(|c| c["name"].as_str())
                .map(str::len)
                .max()
                .unwrap_or(0);
            return list
                .iter()
                .map(|c| {
                    format!(
                        "{:width$}  {}\n",
                        c["name"].as_str().unwrap_or(""),
                        c["help"].as_str().unwrap_or("")
                    )
                })
                .collect();
        }
    }
    let mut out = String::new();
    match v {
        Value::Object(m) if m.is_empty() => out.push_str("ok\n"),
        _ => write_value(&mut out, v, 0),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn arguments_take_json_values_or_strings() {
        let words: Vec<String> = ["iops=100", "kind=read", "on=true", "path=\"a b\""]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let m = parse_arguments(&words).unwrap();
        assert_eq!(m["iops"], json!(100));
        assert_eq!(m["kind"], json!("read"));
        assert_eq!(m["on"], json!(true));
        assert_eq!(m["path"], json!("a b"));
        for bad in ["novalue", "=1"] {
            assert!(parse_arguments(&[bad.to_string()]).is_err(), "{bad}");
        }
        assert!(parse_arguments(&["a=1".into(), "a=2".into()]).is_err());
    }

    #[test]
    fn answers_read_as_indented_lines() {
        let v = json!({"format": "cow", "cow": {"chunks": 8, "backing": {"path": "/b"}},
                       "queues": [{"queue": 0, "reads": 1}], "features": ["flush", "mq"],
                       "failure": null});
        let text = readable("query-disk", &v);
        assert_eq!(
            text,
            // Keys in order (serde_json's maps are sorted).
            "cow:\n  backing:\n    path: /b\n  chunks: 8\nfailure: -\nfeatures: flush, mq\n\
             format: cow\nqueues:\n  [0]\n    queue: 0\n    reads: 1\n"
        );
        assert_eq!(readable("subscribe-events", &json!({})), "ok\n");
        let cmds = json!([{"name": "a", "help": "x"}, {"name": "query-disk", "help": "y"}]);
        assert_eq!(
            readable("query-commands", &cmds),
            "a           x\nquery-disk  y\n"
        );
    }
}
