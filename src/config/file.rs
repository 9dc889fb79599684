//! The `--config FILE`: a TOML table whose keys are the flags' names (`listen`, `cores`,
//! `redis-url` or `redis_url`), turned into `--flag=value` arguments for the binary's parser.
//!
//! The binary appends them only for flags that neither the command line nor the environment
//! set, so the precedence is flag > environment > file, and every value goes through the same
//! parsing and validation as a flag. This module knows nothing of the flags themselves.

/// One setting from the file: the flag's long name (with dashes) and its value as a flag takes
/// it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSetting {
    /// The flag's long name, dashes for underscores (`redis-url`).
    pub flag: String,
    /// The value as the flag would take it (`"2"`, `"127.0.0.1:8080"`, `"a:1,b:2"`).
    pub value: String,
}

/// Parses the file's text. Values are strings, integers, floats, booleans (as `true`/`false`)
/// or arrays of those (joined with commas, as the list flags take them); a nested table, a
/// date or an empty key is an error naming the key.
pub fn parse(text: &str) -> Result<Vec<FileSetting>, String> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let message = e.message().to_string();
        match e.span() {
            Some(span) => {
                let line = text[..span.start.min(text.len())].lines().count().max(1);
                format!("line {line}: {message}")
            }
            None => message,
        }
    })?;
    let mut out = Vec::with_capacity(table.len());
    for (key, value) in table {
        if key.is_empty() {
            return Err("an empty key".into());
        }
        let value = scalar_or_list(&value).ok_or_else(|| {
            format!("{key}: takes a string, a number, a boolean or a list of those")
        })?;
        out.push(FileSetting {
            flag: key.replace('_', "-"),
            value,
        });
    }
    Ok(out)
}

fn scalar_or_list(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::Array(items) => {
            let parts: Option<Vec<String>> = items.iter().map(scalar).collect();
            Some(parts?.join(","))
        }
        other => scalar(other),
    }
}

fn scalar(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        toml::Value::Datetime(_) | toml::Value::Array(_) | toml::Value::Table(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(text: &str) -> Vec<(String, String)> {
        parse(text)
            .unwrap()
            .into_iter()
            .map(|s| (s.flag, s.value))
            .collect()
    }

    #[test]
    fn keys_become_flags_and_values_flag_values() {
        let got = pairs(
            "listen = \"127.0.0.1:8080\"\ncores = 2\nredis_url = \"redis://r:6379\"\n\
             redis-cluster = [\"a:1\", \"b:2\"]\nhistory = \"off\"\nratio = 1.5\nflag = true\n",
        );
        assert!(got.contains(&("listen".into(), "127.0.0.1:8080".into())));
        assert!(got.contains(&("cores".into(), "2".into())));
        assert!(got.contains(&("redis-url".into(), "redis://r:6379".into())));
        assert!(got.contains(&("redis-cluster".into(), "a:1,b:2".into())));
        assert!(got.contains(&("history".into(), "off".into())));
        assert!(got.contains(&("ratio".into(), "1.5".into())));
        assert!(got.contains(&("flag".into(), "true".into())));
    }

    #[test]
    fn bad_files_say_where() {
        let e = parse("listen = \"x\"\ncores = \n").unwrap_err();
        assert!(e.starts_with("line 2"), "{e}");
        let e = parse("[section]\nkey = 1\n").unwrap_err();
        assert!(e.contains("section"), "{e}");
        let e = parse("when = 1979-05-27\n").unwrap_err();
        assert!(e.contains("when"), "{e}");
    }
}
