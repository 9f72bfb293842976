//! A gateway's access log, encoded so that every replica computes the same bytes.
//!
//! Envoy's JSON log format is a `google.protobuf.Struct`, whose generated Rust type holds its
//! fields in a `HashMap`: encoded in an order that differs from one process to the next, it
//! would give the listener a different version on every replica and at every restart. These
//! mirror types have the same field numbers, with the fields in a `BTreeMap` (encoded in name
//! order), and encode to exactly what Envoy decodes as the real messages.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::accesslog::v3::{access_log, AccessLog as PbAccessLog};
use envoy_types::pb::google::protobuf::{value, Any, Value};
use prost::Message;
use vmesh_model::AccessLog;

/// `google.protobuf.Struct`, fields in name order.
#[derive(Clone, PartialEq, Message)]
struct JsonFormat {
    #[prost(btree_map = "string, message", tag = "1")]
    fields: BTreeMap<String, Value>,
}

/// `envoy.config.core.v3.SubstitutionFormatString` with only `json_format` (field 2).
#[derive(Clone, PartialEq, Message)]
struct FormatString {
    #[prost(message, optional, tag = "2")]
    json_format: Option<JsonFormat>,
}

/// `envoy.extensions.access_loggers.stream.v3.StdoutAccessLog` (`log_format` is field 1).
#[derive(Clone, PartialEq, Message)]
struct StdoutLog {
    #[prost(message, optional, tag = "1")]
    log_format: Option<FormatString>,
}

/// `envoy.extensions.access_loggers.file.v3.FileAccessLog` (`path` 1, `log_format` 5).
#[derive(Clone, PartialEq, Message)]
struct FileLog {
    #[prost(string, tag = "1")]
    path: String,
    #[prost(message, optional, tag = "5")]
    log_format: Option<FormatString>,
}

/// The access log of a gateway's connection manager.
pub(crate) fn access_log(log: &AccessLog) -> PbAccessLog {
    let format = FormatString {
        json_format: Some(JsonFormat {
            fields: log
                .fields()
                .into_iter()
                .map(|(name, format)| {
                    (
                        name,
                        Value {
                            kind: Some(value::Kind::StringValue(format)),
                        },
                    )
                })
                .collect(),
        }),
    };
    let (name, typed) = if log.to == "stdout" {
        (
            "envoy.access_loggers.stdout",
            Any {
                type_url:
                    "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"
                        .into(),
                value: StdoutLog {
                    log_format: Some(format),
                }
                .encode_to_vec(),
            },
        )
    } else {
        (
            "envoy.access_loggers.file",
            Any {
                type_url:
                    "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
                        .into(),
                value: FileLog {
                    path: log.to.clone(),
                    log_format: Some(format),
                }
                .encode_to_vec(),
            },
        )
    };
    PbAccessLog {
        name: name.into(),
        config_type: Some(access_log::ConfigType::TypedConfig(typed)),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::substitution_format_string::Format;
    use envoy_types::pb::envoy::extensions::access_loggers::stream::v3::{
        stdout_access_log, StdoutAccessLog,
    };

    #[test]
    fn the_log_decodes_as_envoys_own_messages_and_encodes_the_same_every_time() {
        let log = AccessLog {
            to: "stdout".into(),
            fields: None,
        };
        let a = access_log(&log);
        assert_eq!(a, access_log(&log));
        let Some(access_log::ConfigType::TypedConfig(any)) = &a.config_type else {
            panic!()
        };
        let decoded = StdoutAccessLog::decode(any.value.as_slice()).unwrap();
        let Some(stdout_access_log::AccessLogFormat::LogFormat(f)) = decoded.access_log_format
        else {
            panic!()
        };
        let Some(Format::JsonFormat(s)) = f.format else {
            panic!()
        };
        assert_eq!(s.fields.len(), vmesh_model::DEFAULT_ACCESS_LOG_FIELDS.len());
        assert_eq!(
            s.fields["route_name"].kind,
            Some(value::Kind::StringValue("%ROUTE_NAME%".into()))
        );
    }
}
