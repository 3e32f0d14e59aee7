//! Stanzas the emulator sends, built by pure functions, and small readers for the ones it
//! receives. Wire shapes are WhatsApp's binary XML nodes (`wa-rs-binary` does the codec).

use wa_rs_binary::builder::NodeBuilder;
use wa_rs_binary::node::{Node, NodeContent};

/// The server's JID: the `from` of everything the server itself says.
pub const SERVER: &str = "s.whatsapp.net";
/// Where phone-number users live.
pub const USER_SERVER: &str = "s.whatsapp.net";
/// Where LID users live.
pub const LID_SERVER: &str = "lid";

/// Encodes a node as a frame plaintext (flag byte + binary XML).
pub fn encode(node: &Node) -> Result<Vec<u8>, wa_rs_binary::BinaryError> {
    wa_rs_binary::marshal::marshal(node)
}

/// Decodes a frame plaintext (possibly zlib-compressed) into a node.
pub fn decode(plaintext: &[u8]) -> Result<Node, wa_rs_binary::BinaryError> {
    let unpacked = wa_rs_binary::util::unpack(plaintext)?;
    Ok(wa_rs_binary::marshal::unmarshal_ref(&unpacked)?.to_owned())
}

/// An attribute as a string, whatever its encoded form (string or JID).
pub fn attr(node: &Node, key: &str) -> Option<String> {
    node.attrs.get(key).map(|v| v.to_string_value())
}

/// The bytes content of a node (strings count as their UTF-8 bytes).
pub fn bytes(node: &Node) -> Option<&[u8]> {
    match node.content.as_ref()? {
        NodeContent::Bytes(b) => Some(b),
        NodeContent::String(s) => Some(s.as_bytes()),
        NodeContent::Nodes(_) => None,
    }
}

/// The bytes content of the direct child `tag`.
pub fn child_bytes<'a>(node: &'a Node, tag: &str) -> Option<&'a [u8]> {
    node.get_optional_child(tag).and_then(bytes)
}

pub fn children(node: &Node) -> &[Node] {
    node.children().unwrap_or_default()
}

/// Unix seconds now, as WhatsApp's `t` attributes carry it.
pub fn now_secs() -> String {
    chrono::Utc::now().timestamp().to_string()
}

pub fn iq_result(id: &str, children: Vec<Node>) -> Node {
    let b = NodeBuilder::new("iq").attrs([("from", SERVER), ("type", "result"), ("id", id)]);
    if children.is_empty() { b.build() } else { b.children(children).build() }
}

pub fn iq_error(id: &str, code: u16, text: &str) -> Node {
    NodeBuilder::new("iq")
        .attrs([("from", SERVER), ("type", "error"), ("id", id)])
        .children([NodeBuilder::new("error")
            .attrs([("code", code.to_string()), ("text", text.to_owned())])
            .build()])
        .build()
}

/// Starts QR pairing: the refs the client turns into QR codes, one after the other.
pub fn pair_device(id: &str, refs: &[String]) -> Node {
    NodeBuilder::new("iq")
        .attrs([("from", SERVER), ("type", "set"), ("id", id), ("xmlns", "md")])
        .children([NodeBuilder::new("pair-device")
            .children(refs.iter().map(|r| NodeBuilder::new("ref").bytes(r.as_bytes().to_vec()).build()))
            .build()])
        .build()
}

/// Tells a registering client which account and device it now is.
pub fn pair_success(id: &str, device_identity: Vec<u8>, jid: &str, lid: &str, platform: &str) -> Node {
    NodeBuilder::new("iq")
        .attrs([("from", SERVER), ("type", "set"), ("id", id), ("xmlns", "md")])
        .attr("t", now_secs())
        .children([NodeBuilder::new("pair-success")
            .children([
                NodeBuilder::new("device-identity").bytes(device_identity).build(),
                NodeBuilder::new("platform").attr("name", platform).build(),
                NodeBuilder::new("device").attrs([("jid", jid), ("lid", lid)]).build(),
            ])
            .build()])
        .build()
}

/// Login accepted.
pub fn success(lid: &str, push_name: &str) -> Node {
    NodeBuilder::new("success")
        .attrs([
            ("t", now_secs()),
            ("lid", lid.to_owned()),
            ("display_name", push_name.to_owned()),
            ("location", "emulator".to_owned()),
            ("props", "0".to_owned()),
        ])
        .build()
}

/// Login refused; `401` means this device is no longer linked.
pub fn failure(reason: u16) -> Node {
    NodeBuilder::new("failure")
        .attrs([("reason", reason.to_string()), ("location", "emulator".to_owned())])
        .build()
}

pub fn stream_error(code: &str) -> Node {
    NodeBuilder::new("stream:error").attr("code", code).build()
}

/// The stream ends because the device was removed (`device_removed`) or another
/// connection took its place (`replaced`).
pub fn stream_conflict(kind: &str) -> Node {
    NodeBuilder::new("stream:error")
        .attr("code", if kind == "device_removed" { "401" } else { "409" })
        .children([NodeBuilder::new("conflict").attr("type", kind).build()])
        .build()
}

/// The server took a stanza of `class` (message, receipt, notification) with this id.
pub fn ack(class: &str, id: &str, from: &str) -> Node {
    NodeBuilder::new("ack")
        .attrs([("class", class), ("id", id), ("from", from)])
        .attr("t", now_secs())
        .build()
}

/// A receipt from `from` for message `id`; `kind` None is a delivery receipt.
pub fn receipt(from: &str, id: &str, kind: Option<&str>) -> Node {
    let mut b = NodeBuilder::new("receipt")
        .attrs([("from", from), ("id", id)])
        .attr("t", now_secs());
    if let Some(k) = kind {
        b = b.attr("type", k);
    }
    b.build()
}

/// An end-to-end encrypted message to one device.
pub fn message(
    from: &str,
    id: &str,
    media: bool,
    push_name: &str,
    enc_type: &str,
    ciphertext: Vec<u8>,
    offline: bool,
) -> Node {
    let mut b = NodeBuilder::new("message").attrs([
        ("from", from),
        ("id", id),
        ("type", if media { "media" } else { "text" }),
        ("notify", push_name),
    ])
    .attr("t", now_secs());
    if offline {
        b = b.attr("offline", "1");
    }
    b.children([NodeBuilder::new("enc")
        .attrs([("v", "2"), ("type", enc_type)])
        .bytes(ciphertext)
        .build()])
        .build()
}

/// End of the queued (offline) stanzas after the client went active.
pub fn offline_done(count: usize) -> Node {
    NodeBuilder::new("ib")
        .attr("from", SERVER)
        .children([NodeBuilder::new("offline").attr("count", count.to_string()).build()])
        .build()
}

/// The account's display name, as the server pushes it to linked devices.
pub fn account_sync_push_name(id: &str, push_name: &str) -> Node {
    NodeBuilder::new("notification")
        .attrs([
            ("from", SERVER),
            ("type", "account_sync"),
            ("id", id),
            ("pushname", push_name),
        ])
        .attr("t", now_secs())
        .build()
}

/// Stage 2 of pair-code linking: the phone's wrapped ephemeral key and identity key.
pub fn link_code_notification(id: &str, wrapped_primary_ephemeral: Vec<u8>, primary_identity: Vec<u8>) -> Node {
    NodeBuilder::new("notification")
        .attrs([("from", SERVER), ("type", "link_code_companion_reg"), ("id", id)])
        .attr("t", now_secs())
        .children([NodeBuilder::new("link_code_companion_reg")
            .children([
                NodeBuilder::new("link_code_pairing_wrapped_primary_ephemeral_pub")
                    .bytes(wrapped_primary_ephemeral)
                    .build(),
                NodeBuilder::new("primary_identity_pub").bytes(primary_identity).build(),
            ])
            .build()])
        .build()
}

/// One encrypted payload of an outgoing `<message>`, addressed to one device.
#[derive(Debug, Clone, PartialEq)]
pub struct EncPart {
    /// The device JID from `<to jid>` (or the stanza's `to` for a single-device message).
    pub to: String,
    /// `pkmsg`, `msg` or `skmsg`.
    pub kind: String,
    /// Padding version (`v`).
    pub version: u8,
    pub ciphertext: Vec<u8>,
}

/// The encrypted parts of a `<message>` the client sent.
pub fn enc_parts(msg: &Node) -> Vec<EncPart> {
    let mut out = Vec::new();
    let mut push = |to: String, enc: &Node| {
        if let Some(ct) = bytes(enc) {
            out.push(EncPart {
                to,
                kind: attr(enc, "type").unwrap_or_default(),
                version: attr(enc, "v").and_then(|v| v.parse().ok()).unwrap_or(2),
                ciphertext: ct.to_vec(),
            });
        }
    };
    let stanza_to = attr(msg, "to").unwrap_or_default();
    for enc in msg.get_children_by_tag("enc") {
        push(stanza_to.clone(), enc);
    }
    if let Some(participants) = msg.get_optional_child("participants") {
        for to in participants.get_children_by_tag("to") {
            let jid = attr(to, "jid").unwrap_or_default();
            for enc in to.get_children_by_tag("enc") {
                push(jid.clone(), enc);
            }
        }
    }
    out
}

/// A JID split into its parts: `user[:device]@server`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Address {
    pub user: String,
    pub device: u16,
    pub server: String,
}

impl Address {
    pub fn parse(jid: &str) -> Option<Self> {
        let (user_part, server) = jid.split_once('@').unwrap_or(("", jid));
        // An agent suffix (`user.0:device`) is legal; the emulator has no agents.
        let (user, device) = match user_part.split_once(':') {
            Some((u, d)) => (u, d.parse().ok()?),
            None => (user_part, 0),
        };
        let user = user.split('.').next().unwrap_or(user);
        Some(Self {
            user: user.to_owned(),
            device,
            server: server.to_owned(),
        })
    }

    pub fn user_jid(user: &str) -> String {
        format!("{user}@{USER_SERVER}")
    }

    pub fn device_jid(user: &str, device: u16) -> String {
        if device == 0 {
            Self::user_jid(user)
        } else {
            format!("{user}:{device}@{USER_SERVER}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_survive_the_codec() {
        let n = pair_success("abc", vec![1, 2, 3], "15550000001:2@s.whatsapp.net", "100000001:2@lid", "Chrome");
        let back = decode(&encode(&n).unwrap()).unwrap();
        assert_eq!(back.tag, "iq");
        assert_eq!(attr(&back, "from").as_deref(), Some(SERVER));
        let ps = back.get_optional_child("pair-success").unwrap();
        assert_eq!(child_bytes(ps, "device-identity"), Some(&[1u8, 2, 3][..]));
        let dev = ps.get_optional_child("device").unwrap();
        assert_eq!(attr(dev, "jid").as_deref(), Some("15550000001:2@s.whatsapp.net"));
        assert_eq!(attr(dev, "lid").as_deref(), Some("100000001:2@lid"));
    }

    #[test]
    fn enc_parts_of_a_fanned_out_message() {
        let msg = NodeBuilder::new("message")
            .attrs([("to", "15551112222@s.whatsapp.net"), ("id", "X")])
            .children([NodeBuilder::new("participants")
                .children([
                    NodeBuilder::new("to")
                        .attr("jid", "15551112222@s.whatsapp.net")
                        .children([NodeBuilder::new("enc").attrs([("v", "2"), ("type", "pkmsg")]).bytes(vec![9]).build()])
                        .build(),
                    NodeBuilder::new("to")
                        .attr("jid", "15550000001@s.whatsapp.net")
                        .children([NodeBuilder::new("enc").attrs([("v", "2"), ("type", "msg")]).bytes(vec![8]).build()])
                        .build(),
                ])
                .build()])
            .build();
        let msg = decode(&encode(&msg).unwrap()).unwrap();
        let parts = enc_parts(&msg);
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].to, "15551112222@s.whatsapp.net");
        assert_eq!(parts[0].kind, "pkmsg");
        assert_eq!(parts[1].kind, "msg");
        assert_eq!(parts[1].ciphertext, vec![8]);
    }

    #[test]
    fn addresses() {
        let check = |s: &str, user: &str, device: u16, server: &str| {
            assert_eq!(
                Address::parse(s),
                Some(Address { user: user.into(), device, server: server.into() }),
                "{s}"
            );
        };
        check("15550000001@s.whatsapp.net", "15550000001", 0, "s.whatsapp.net");
        check("15550000001:7@s.whatsapp.net", "15550000001", 7, "s.whatsapp.net");
        check("15550000001.0:7@s.whatsapp.net", "15550000001", 7, "s.whatsapp.net");
        check("100000001:3@lid", "100000001", 3, "lid");
        assert_eq!(Address::parse("1:x@s.whatsapp.net"), None);
        assert_eq!(Address::device_jid("1555", 0), "1555@s.whatsapp.net");
        assert_eq!(Address::device_jid("1555", 4), "1555:4@s.whatsapp.net");
    }
}
