//! Builders for the info-query answers the server gives linked devices (usync, prekey
//! bundles, media hosts) and readers for the queries themselves. Pure functions over data.

use wa_rs_binary::builder::NodeBuilder;
use wa_rs_binary::node::Node;

use crate::signal::{BundleParts, SignedPreKeyPublic};
use crate::stanza::{self, attr, bytes, child_bytes, iq_result};

/// What the server knows about one user, for usync answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserFacts {
    /// The user JID the answer is about (`<digits>@s.whatsapp.net`).
    pub jid: String,
    pub registered: bool,
    pub lid: Option<String>,
    /// `(device id, key index)`; device 0 (the phone) has no key index.
    pub devices: Vec<(u16, Option<u32>)>,
    pub status: Option<String>,
}

/// Who a usync `<user>` asks about: a JID attribute or a `<contact>` phone number.
pub fn usync_subjects(iq: &Node) -> Vec<String> {
    let Some(list) = iq.get_optional_child_by_tag(&["usync", "list"]) else {
        return Vec::new();
    };
    list.get_children_by_tag("user")
        .filter_map(|u| {
            attr(u, "jid").or_else(|| {
                u.get_optional_child("contact")
                    .and_then(bytes)
                    .map(|b| String::from_utf8_lossy(b).into_owned())
            })
        })
        .collect()
}

/// Answers a usync query; `facts` has one entry per subject, in order.
pub fn usync_result(iq: &Node, facts: &[UserFacts]) -> Node {
    let id = attr(iq, "id").unwrap_or_default();
    let usync = iq.get_optional_child("usync");
    let query: Vec<String> = usync
        .and_then(|u| u.get_optional_child("query"))
        .map(|q| stanza::children(q).iter().map(|c| c.tag.clone()).collect())
        .unwrap_or_default();
    let users = facts.iter().map(|f| {
        let mut children = Vec::new();
        for q in &query {
            match q.as_str() {
                "contact" => children.push(
                    NodeBuilder::new("contact")
                        .attr("type", if f.registered { "in" } else { "out" })
                        .build(),
                ),
                "devices" if f.registered => children.push(devices_node(&f.devices)),
                "lid" => {
                    if let Some(lid) = &f.lid {
                        children.push(NodeBuilder::new("lid").attr("val", lid.as_str()).build());
                    }
                }
                "status" => {
                    let status = f.status.clone().unwrap_or_default();
                    children.push(NodeBuilder::new("status").string_content(status).build());
                }
                "picture" => children.push(
                    NodeBuilder::new("picture")
                        .children([NodeBuilder::new("error").attrs([("code", "404"), ("text", "item-not-found")]).build()])
                        .build(),
                ),
                _ => {}
            }
        }
        NodeBuilder::new("user").attr("jid", f.jid.as_str()).children(children).build()
    });
    let mut usync_out = NodeBuilder::new("usync");
    if let Some(u) = usync {
        for key in ["sid", "mode", "context", "index"] {
            if let Some(v) = attr(u, key) {
                usync_out = usync_out.attr(key, v);
            }
        }
    }
    let usync_out = usync_out
        .attr("last", "true")
        .children([NodeBuilder::new("list").children(users).build()])
        .build();
    iq_result(&id, vec![usync_out])
}

fn devices_node(devices: &[(u16, Option<u32>)]) -> Node {
    let list = devices.iter().map(|(id, key_index)| {
        let b = NodeBuilder::new("device").attr("id", id.to_string());
        match key_index {
            Some(k) => b.attr("key-index", k.to_string()).build(),
            None => b.build(),
        }
    });
    // The hash lets clients skip unchanged lists; any value that changes with the list works.
    let hash = devices.iter().fold(0u64, |h, (id, k)| {
        h.wrapping_mul(31).wrapping_add(u64::from(*id) * 1000 + u64::from(k.unwrap_or(0)))
    });
    NodeBuilder::new("devices")
        .children([NodeBuilder::new("device-list")
            .attr("hash", format!("2:{hash:x}"))
            .children(list)
            .build()])
        .build()
}

/// The device JIDs a prekey fetch (`<key><user jid/>…</key>`) asks for.
pub fn prekey_subjects(iq: &Node) -> Vec<String> {
    iq.get_optional_child("key")
        .map(|k| k.get_children_by_tag("user").filter_map(|u| attr(u, "jid")).collect())
        .unwrap_or_default()
}

fn id3(id: u32) -> Vec<u8> {
    id.to_be_bytes()[1..].to_vec()
}

/// The answer for one device of a prekey fetch: its JID, and its bundle (with the signed
/// device identity for linked devices) or `None` when unknown.
pub type PreKeyAnswer = (String, Option<(BundleParts, Option<Vec<u8>>)>);

/// Answers a prekey fetch: a bundle per known device, an error entry otherwise.
pub fn prekey_result(id: &str, answers: &[PreKeyAnswer]) -> Node {
    let users = answers.iter().map(|(jid, bundle)| match bundle {
        Some((b, device_identity)) => {
            let mut children = vec![
                NodeBuilder::new("registration").bytes(b.registration_id.to_be_bytes().to_vec()).build(),
                NodeBuilder::new("type").bytes(vec![5]).build(),
                NodeBuilder::new("identity").bytes(b.identity.to_vec()).build(),
                NodeBuilder::new("skey")
                    .children([
                        NodeBuilder::new("id").bytes(id3(b.signed_prekey.id)).build(),
                        NodeBuilder::new("value").bytes(b.signed_prekey.public.to_vec()).build(),
                        NodeBuilder::new("signature").bytes(b.signed_prekey.signature.clone()).build(),
                    ])
                    .build(),
            ];
            if let Some((pid, public)) = &b.prekey {
                children.push(
                    NodeBuilder::new("key")
                        .children([
                            NodeBuilder::new("id").bytes(id3(*pid)).build(),
                            NodeBuilder::new("value").bytes(public.to_vec()).build(),
                        ])
                        .build(),
                );
            }
            if let Some(di) = device_identity {
                children.push(NodeBuilder::new("device-identity").bytes(di.clone()).build());
            }
            NodeBuilder::new("user").attr("jid", jid.as_str()).children(children).build()
        }
        None => NodeBuilder::new("user")
            .attr("jid", jid.as_str())
            .children([NodeBuilder::new("error").attrs([("code", "404"), ("text", "item-not-found")]).build()])
            .build(),
    });
    iq_result(id, vec![NodeBuilder::new("list").children(users).build()])
}

/// A prekey upload (`xmlns="encrypt" type="set"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreKeyUpload {
    pub registration_id: u32,
    pub identity: [u8; 32],
    pub signed_prekey: SignedPreKeyPublic,
    pub prekeys: Vec<(u32, [u8; 32])>,
}

fn key32(b: Option<&[u8]>) -> Option<[u8; 32]> {
    b.and_then(|b| b.try_into().ok())
}

fn int_be(b: &[u8]) -> Option<u32> {
    (b.len() <= 4 && !b.is_empty()).then(|| b.iter().fold(0u32, |acc, x| (acc << 8) | u32::from(*x)))
}

pub fn parse_prekey_upload(iq: &Node) -> Result<PreKeyUpload, &'static str> {
    let registration_id = child_bytes(iq, "registration").and_then(int_be).ok_or("registration id")?;
    let identity = key32(child_bytes(iq, "identity")).ok_or("identity key")?;
    let skey = iq.get_optional_child("skey").ok_or("signed prekey")?;
    let signed_prekey = SignedPreKeyPublic {
        id: child_bytes(skey, "id").and_then(int_be).ok_or("signed prekey id")?,
        public: key32(child_bytes(skey, "value")).ok_or("signed prekey value")?,
        signature: child_bytes(skey, "signature")
            .filter(|s| s.len() == 64)
            .ok_or("signed prekey signature")?
            .to_vec(),
    };
    let mut prekeys = Vec::new();
    if let Some(list) = iq.get_optional_child("list") {
        for key in list.get_children_by_tag("key") {
            let id = child_bytes(key, "id").and_then(int_be).ok_or("prekey id")?;
            let value = key32(child_bytes(key, "value")).ok_or("prekey value")?;
            prekeys.push((id, value));
        }
    }
    Ok(PreKeyUpload {
        registration_id,
        identity,
        signed_prekey,
        prekeys,
    })
}

/// The media hosts and upload credential (`xmlns="w:m"` `<media_conn/>`).
pub fn media_conn_result(id: &str, auth: &str, host: &str) -> Node {
    iq_result(
        id,
        vec![NodeBuilder::new("media_conn")
            .attrs([("auth", auth), ("ttl", "300"), ("auth_ttl", "21600"), ("max_buckets", "12")])
            .children([NodeBuilder::new("host").attrs([("hostname", host), ("type", "primary")]).build()])
            .build()],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stanza::{decode, encode};

    fn roundtrip(n: Node) -> Node {
        decode(&encode(&n).unwrap()).unwrap()
    }

    #[test]
    fn usync_device_query() {
        let q = roundtrip(
            NodeBuilder::new("iq")
                .attrs([("id", "7"), ("xmlns", "usync"), ("type", "get")])
                .children([NodeBuilder::new("usync")
                    .attrs([("sid", "s1"), ("mode", "query"), ("context", "message")])
                    .children([
                        NodeBuilder::new("query")
                            .children([NodeBuilder::new("devices").attr("version", "2").build()])
                            .build(),
                        NodeBuilder::new("list")
                            .children([
                                NodeBuilder::new("user").attr("jid", "15551112222@s.whatsapp.net").build(),
                                NodeBuilder::new("user")
                                    .children([NodeBuilder::new("contact").string_content("+15553334444").build()])
                                    .build(),
                            ])
                            .build(),
                    ])
                    .build()])
                .build(),
        );
        assert_eq!(usync_subjects(&q), vec!["15551112222@s.whatsapp.net", "+15553334444"]);
        let facts = vec![
            UserFacts {
                jid: "15551112222@s.whatsapp.net".into(),
                registered: true,
                lid: None,
                devices: vec![(0, None), (3, Some(2))],
                status: None,
            },
            UserFacts {
                jid: "15553334444@s.whatsapp.net".into(),
                registered: false,
                lid: None,
                devices: vec![],
                status: None,
            },
        ];
        let r = roundtrip(usync_result(&q, &facts));
        assert_eq!(attr(&r, "id").as_deref(), Some("7"));
        let list = r.get_optional_child_by_tag(&["usync", "list"]).unwrap();
        let users: Vec<&Node> = list.get_children_by_tag("user").collect();
        let dl = users[0].get_optional_child_by_tag(&["devices", "device-list"]).unwrap();
        let ids: Vec<String> = dl.get_children_by_tag("device").filter_map(|d| attr(d, "id")).collect();
        assert_eq!(ids, vec!["0", "3"]);
        assert!(users[1].get_optional_child("devices").is_none());
    }

    #[test]
    fn prekey_upload_parses() {
        let up = roundtrip(
            NodeBuilder::new("iq")
                .children([
                    NodeBuilder::new("registration").bytes(vec![0, 0, 1, 2]).build(),
                    NodeBuilder::new("type").bytes(vec![5]).build(),
                    NodeBuilder::new("identity").bytes(vec![1; 32]).build(),
                    NodeBuilder::new("list")
                        .children([NodeBuilder::new("key")
                            .children([
                                NodeBuilder::new("id").bytes(vec![0, 0, 9]).build(),
                                NodeBuilder::new("value").bytes(vec![2; 32]).build(),
                            ])
                            .build()])
                        .build(),
                    NodeBuilder::new("skey")
                        .children([
                            NodeBuilder::new("id").bytes(vec![0, 0, 1]).build(),
                            NodeBuilder::new("value").bytes(vec![3; 32]).build(),
                            NodeBuilder::new("signature").bytes(vec![4; 64]).build(),
                        ])
                        .build(),
                ])
                .build(),
        );
        let p = parse_prekey_upload(&up).unwrap();
        assert_eq!(p.registration_id, 258);
        assert_eq!(p.prekeys, vec![(9, [2; 32])]);
        assert_eq!(p.signed_prekey.id, 1);
        let bad = NodeBuilder::new("iq").build();
        assert_eq!(parse_prekey_upload(&bad), Err("registration id"));
    }
}
