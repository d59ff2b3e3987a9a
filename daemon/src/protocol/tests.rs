//! The envelope parser, the typed commands against their documented JSON, replies, events.

use super::*;

#[test]
fn parse_accepts_a_full_request() {
    let request =
        Request::parse(br#"{"execute": "volume-info", "arguments": {"name": "a"}, "id": 3}"#)
            .unwrap();
    assert_eq!(request.execute, "volume-info");
    assert_eq!(request.arguments.get("name"), Some(&json!("a")));
    assert_eq!(request.id, Some(json!(3)));
}

#[test]
fn parse_accepts_missing_or_null_arguments() {
    assert!(Request::parse(br#"{"execute": "volume-list"}"#)
        .unwrap()
        .arguments
        .is_empty());
    assert!(Request::parse(br#"{"execute": "x", "arguments": null}"#)
        .unwrap()
        .id
        .is_none());
}

#[test]
fn parse_rejects_every_malformed_shape_with_a_protocol_error() {
    let cases: &[&[u8]] = &[
        b"",
        b"{",
        b"\xff\xfe",
        b"[1,2]",
        b"\"execute\"",
        b"{}",
        b"{\"execute\": 5}",
        b"{\"execute\": \"x\", \"arguments\": [1]}",
        b"{\"execute\": \"x\", \"bogus\": 1}",
    ];
    for case in cases {
        let (err, _) = Request::parse(case).unwrap_err();
        assert_eq!(
            err.class,
            ErrorClass::ProtocolError,
            "{:?}",
            String::from_utf8_lossy(case)
        );
    }
}

#[test]
fn parse_keeps_the_id_of_a_bad_request_for_the_reply() {
    let (_, id) = Request::parse(br#"{"execute": 1, "id": "abc"}"#).unwrap_err();
    assert_eq!(id, Some(json!("abc")));
}

/// One command of every kind and its request line as docs/CONTROL.md writes it.
fn documented() -> Vec<(Command, Value)> {
    let volume = || VolumeNameArgs { name: "vm1".into() };
    let checkpoint = || CheckpointArgs {
        volume: "vm1".into(),
        name: "c1".into(),
    };
    vec![
        (
            Command::QmpCapabilities(NoArguments {}),
            json!({"execute": "qmp_capabilities"}),
        ),
        (
            Command::QueryVersion(NoArguments {}),
            json!({"execute": "query-version"}),
        ),
        (
            Command::QueryCommands(NoArguments {}),
            json!({"execute": "query-commands"}),
        ),
        (
            Command::QueryStatus(NoArguments {}),
            json!({"execute": "query-status"}),
        ),
        (
            Command::VolumeCreate(VolumeCreateArgs {
                name: "vm1".into(),
                backing: "/srv/vm1.raw".into(),
                size: Some(1 << 30),
                granularity: Some(65536),
                tracking: Some(Tracking::Fast),
            }),
            json!({"execute": "volume-create", "arguments": {"name": "vm1",
                "backing": "/srv/vm1.raw", "size": 1 << 30, "granularity": 65536,
                "tracking": "fast"}}),
        ),
        (
            Command::VolumeList(NoArguments {}),
            json!({"execute": "volume-list"}),
        ),
        (
            Command::VolumeInfo(volume()),
            json!({"execute": "volume-info", "arguments": {"name": "vm1"}}),
        ),
        (
            Command::VolumeRemove(volume()),
            json!({"execute": "volume-remove", "arguments": {"name": "vm1"}}),
        ),
        (
            Command::CheckpointCreate(checkpoint()),
            json!({"execute": "checkpoint-create", "arguments": {"volume": "vm1", "name": "c1"}}),
        ),
        (
            Command::CheckpointList(CheckpointListArgs {
                volume: "vm1".into(),
            }),
            json!({"execute": "checkpoint-list", "arguments": {"volume": "vm1"}}),
        ),
        (
            Command::CheckpointDelete(checkpoint()),
            json!({"execute": "checkpoint-delete", "arguments": {"volume": "vm1", "name": "c1"}}),
        ),
        (
            Command::BackupBegin(BackupBeginArgs {
                volumes: vec!["vm1".into(), "vm2".into()],
                checkpoint: Some("c2".into()),
                incremental: Some("c1".into()),
                export_name: Some("{volume}@b".into()),
                push: Some("/backup/{volume}.delta".into()),
                push_format: Some(PushFormat::Delta),
                cow_limit: Some(1 << 20),
                lease: true,
                freeze: vec!["/srv".into()],
                hooks: Some(vec![]),
                guest_agent: Some("/run/qga.sock".into()),
                quiesce_timeout_ms: Some(5000),
                force: true,
            }),
            json!({"execute": "backup-begin", "arguments": {"volumes": ["vm1", "vm2"],
                "checkpoint": "c2", "incremental": "c1", "export_name": "{volume}@b",
                "push": "/backup/{volume}.delta", "push_format": "delta",
                "cow_limit": 1 << 20, "lease": true, "freeze": ["/srv"], "hooks": [],
                "guest_agent": "/run/qga.sock", "quiesce_timeout_ms": 5000, "force": true}}),
        ),
        (
            Command::BackupBegin(BackupBeginArgs {
                volumes: vec!["vm1".into()],
                ..BackupBeginArgs::default()
            }),
            json!({"execute": "backup-begin", "arguments": {"volumes": ["vm1"]}}),
        ),
        (
            Command::BackupEnd(BackupEndArgs {
                volume: Some("vm1".into()),
                id: None,
                failed: false,
            }),
            json!({"execute": "backup-end", "arguments": {"volume": "vm1"}}),
        ),
        (
            Command::BackupEnd(BackupEndArgs {
                volume: Some("vm1".into()),
                id: None,
                failed: true,
            }),
            json!({"execute": "backup-end", "arguments": {"volume": "vm1", "failed": true}}),
        ),
        (
            Command::BackupStatus(NoArguments {}),
            json!({"execute": "backup-status"}),
        ),
        (
            Command::VolumeAttach(VolumeAttachArgs {
                name: "data".into(),
                via: Some(crate::attach::Via::Fuse),
                read_only: true,
                queues: Some(2),
            }),
            json!({"execute": "volume-attach", "arguments": {"name": "data", "via": "fuse",
                "read_only": true, "queues": 2}}),
        ),
        (
            Command::VolumeAttach(VolumeAttachArgs {
                name: "data@backup".into(),
                via: None,
                read_only: false,
                queues: None,
            }),
            json!({"execute": "volume-attach", "arguments": {"name": "data@backup"}}),
        ),
        (
            Command::VolumeDetach(VolumeNameArgs {
                name: "data".into(),
            }),
            json!({"execute": "volume-detach", "arguments": {"name": "data"}}),
        ),
        (
            Command::VolumeRollback(VolumeRollbackArgs {
                name: "vm1".into(),
                checkpoint: "c2".into(),
                base: "/backup/vm1-c1.delta".into(),
                deltas: vec!["/backup/vm1-c2.delta".into()],
                repository: None,
                point: None,
            }),
            json!({"execute": "volume-rollback", "arguments": {"name": "vm1",
                "checkpoint": "c2", "base": "/backup/vm1-c1.delta",
                "deltas": ["/backup/vm1-c2.delta"]}}),
        ),
        (
            Command::VolumeRollback(VolumeRollbackArgs {
                name: "vm1".into(),
                checkpoint: "c2".into(),
                base: Default::default(),
                deltas: Vec::new(),
                repository: Some("s3://backups/site1".into()),
                point: Some("vm1@c2".into()),
            }),
            json!({"execute": "volume-rollback", "arguments": {"name": "vm1",
                "checkpoint": "c2", "repository": "s3://backups/site1", "point": "vm1@c2"}}),
        ),
    ]
}

#[test]
fn an_unknown_front_end_is_refused_naming_the_argument() {
    let err = command(json!({"execute": "volume-attach",
        "arguments": {"name": "data", "via": "ublk"}}))
    .unwrap_err();
    assert_eq!(err.class, ErrorClass::InvalidParameter);
    assert!(err.desc.contains("\"via\""), "{}", err.desc);
}

#[test]
fn every_command_serializes_to_its_documented_json_and_back() {
    for (command, line) in documented() {
        assert_eq!(command.to_request(None).unwrap(), line);
        let with_id = command.to_request(Some(json!(7))).unwrap();
        assert_eq!(with_id["id"], json!(7));
        let request = Request::parse(with_id.to_string().as_bytes()).unwrap();
        assert_eq!(Command::from_request(&request).unwrap(), command, "{line}");
    }
}

#[test]
fn the_command_list_names_every_variant_once() {
    let mut served: Vec<String> = documented()
        .iter()
        .map(|(_, line)| line["execute"].as_str().unwrap().to_string())
        .collect();
    served.dedup();
    assert_eq!(served, Command::NAMES);
}

fn command(line: Value) -> Result<Command, CommandError> {
    Command::from_request(&Request::parse(line.to_string().as_bytes()).unwrap())
}

#[test]
fn unknown_commands_are_command_not_found() {
    let err = command(json!({"execute": "volume-lsit"})).unwrap_err();
    assert_eq!(err.class, ErrorClass::CommandNotFound);
    assert!(err.desc.contains("volume-lsit"), "{}", err.desc);
}

#[test]
fn unknown_missing_and_ill_typed_arguments_are_refused_by_name() {
    for (line, argument) in [
        (
            json!({"execute": "backup-begin", "arguments": {"volumes": ["v"], "incrmental": "c"}}),
            "incrmental",
        ),
        (
            json!({"execute": "volume-list", "arguments": {"all": true}}),
            "all",
        ),
        (json!({"execute": "volume-info"}), "name"),
        (
            json!({"execute": "volume-info", "arguments": {"name": 5}}),
            "name",
        ),
        (
            json!({"execute": "volume-create", "arguments": {"name": "v", "backing": "/b", "size": -1}}),
            "size",
        ),
        (
            json!({"execute": "backup-begin", "arguments": {"volumes": ["v"], "lease": "yes"}}),
            "lease",
        ),
        (
            json!({"execute": "backup-begin", "arguments": {"volumes": [1]}}),
            "volumes",
        ),
    ] {
        let err = command(line.clone()).unwrap_err();
        assert_eq!(err.class, ErrorClass::InvalidParameter, "{line}");
        assert!(err.desc.contains(argument), "{line}: {}", err.desc);
    }
}

#[test]
fn null_reads_as_an_absent_optional_argument() {
    let begin = command(
        json!({"execute": "backup-begin", "arguments": {"volumes": ["v"],
        "lease": null, "freeze": null, "hooks": null, "checkpoint": null}}),
    )
    .unwrap();
    assert_eq!(
        begin,
        Command::BackupBegin(BackupBeginArgs {
            volumes: vec!["v".into()],
            ..BackupBeginArgs::default()
        })
    );
}

#[test]
fn replies_echo_the_id() {
    assert_eq!(
        reply_return(json!({}), Some(json!(9))),
        json!({"return": {}, "id": 9})
    );
    let err = CommandError::new(ErrorClass::NotFound, "gone");
    assert_eq!(
        reply_error(&err, None),
        json!({"error": {"class": "NotFound", "desc": "gone"}})
    );
}

#[test]
fn events_round_trip_through_json() {
    let event = Event::new("BACKUP_COMPLETED", json!({"id": "b1"}));
    let text = serde_json::to_string(&event).unwrap();
    let back: Event = serde_json::from_str(&text).unwrap();
    assert_eq!(back, event);
}
