//! `serve --log-format json`: every line on stderr is one JSON object.

mod common;

use common::{PATIENCE, Server};

#[test]
fn json_logs_are_one_object_per_line() {
    let mut server = Server::start(
        "epoll",
        &["--tcp", "127.0.0.1:0", "--log-format", "json", "--verbose"],
    );
    drop(server.connect_tcp());
    server.terminate();
    assert!(server.wait_exit(PATIENCE).expect("exit").success());
    server.wait_for_log(r#""message":"stopped""#);
    let stderr = server.stderr();
    for line in stderr.lines() {
        let object: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object ({e}): {line:?}"));
        for key in ["timestamp", "level", "message"] {
            assert!(object.get(key).is_some(), "no {key} in {line}");
        }
    }
    assert!(stderr.lines().count() >= 2, "{stderr}");
}
