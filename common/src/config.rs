//! Loading YAML configuration files with errors that name the file and the field.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// Splits `host:port` (the host may be a bracketed IPv6 address) from a server address whose
/// scheme the caller has removed. `None` if either part is missing or the port is not a number.
pub fn split_host_port(address: &str) -> Option<(String, u16)> {
    let (host, port) = address.trim_end_matches('/').rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| (host.to_owned(), port))
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {path}: field `{field}`: {message}")]
    Invalid {
        path: PathBuf,
        /// Dotted path of the offending field (`.` for the document itself). For an unknown field
        /// this is the field itself (`modules.cloudHub.bogus`).
        field: String,
        message: String,
    },
    #[error("invalid config file {path}: {message}")]
    Value { path: PathBuf, message: String },
}

/// Parses `text` (the contents of `path`) into `T`. Config structs use
/// `#[serde(deny_unknown_fields)]`, so a misspelt field is an error rather than silently ignored.
pub fn parse_yaml<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let mut field = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.to_string();
        // serde reports an unknown field at its parent; name the field itself.
        if let Some(unknown) = message
            .strip_prefix("unknown field `")
            .and_then(|rest| rest.split('`').next())
        {
            field = if field == "." {
                unknown.to_owned()
            } else if field == unknown || field.ends_with(&format!(".{unknown}")) {
                field
            } else {
                format!("{field}.{unknown}")
            };
        }
        ConfigError::Invalid {
            path: path.to_owned(),
            field,
            message,
        }
    })
}

/// Reads and parses the YAML file at `path`.
pub fn load_yaml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_yaml(path, &text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    struct Outer {
        #[serde(default)]
        inner: Inner,
    }

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    struct Inner {
        #[serde(default)]
        port: u16,
    }

    fn p() -> &'static Path {
        Path::new("/etc/kedge/test.yaml")
    }

    #[test]
    fn unknown_field_is_named_with_its_path() {
        let e = parse_yaml::<Outer>(p(), "inner:\n  prot: 5\n").unwrap_err();
        match &e {
            ConfigError::Invalid { field, .. } => assert_eq!(field, "inner.prot"),
            other => panic!("unexpected {other}"),
        }
        let text = e.to_string();
        assert!(text.contains("/etc/kedge/test.yaml"), "{text}");
        assert!(text.contains("inner.prot"), "{text}");
        let e = parse_yaml::<Outer>(p(), "bogus: 1\n").unwrap_err();
        assert!(matches!(e, ConfigError::Invalid { ref field, .. } if field == "bogus"));
    }

    #[test]
    fn ill_typed_field_is_named() {
        let e = parse_yaml::<Outer>(p(), "inner:\n  port: many\n").unwrap_err();
        assert!(
            matches!(e, ConfigError::Invalid { ref field, .. } if field == "inner.port"),
            "{e}"
        );
        let e = parse_yaml::<Outer>(p(), "inner:\n  port: 70000\n").unwrap_err();
        assert!(
            matches!(e, ConfigError::Invalid { ref field, .. } if field == "inner.port"),
            "{e}"
        );
    }

    #[test]
    fn broken_yaml_is_an_error_not_a_panic() {
        assert!(parse_yaml::<Outer>(p(), "inner: [\n").is_err());
        assert!(parse_yaml::<Outer>(p(), "\u{0}\u{1}").is_err());
        assert!(parse_yaml::<Outer>(p(), "- a\n- b\n").is_err());
    }

    #[test]
    fn missing_file_names_the_path() {
        let e = load_yaml::<Outer>(Path::new("/nonexistent/kedge.yaml")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/kedge.yaml"));
    }
}
