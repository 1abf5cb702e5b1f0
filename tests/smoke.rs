mod common;
use common::*;

#[test]
fn a_message_sent_to_a_uid_arrives() {
    let server = Server::start(&[]);
    let mut ws = server.ws("uid=1");
    server.send_ok(r#"{"topic":"uids","topic_ids":["1"],"msg":{"hello":"world"},"time":"2019-12-12 12:12:12"}"#);
    let mut m = recv_json(&mut ws);
    let id = m.as_object_mut().unwrap().remove("id");
    assert!(
        id.is_some_and(|id| id.is_string()),
        "every push carries an id"
    );
    assert_eq!(
        m,
        serde_json::json!({"types":"notice","msg":{"hello":"world"},"time":"2019-12-12 12:12:12"})
    );
}
