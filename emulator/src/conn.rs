//! One client connection: handshake, then registration (QR / pair code) or login, then the
//! stanza loop. Everything a client sends is answered here; what other parties do to it
//! (a phone scans, a contact writes) arrives through its outbound channel.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message as WsMessage, WebSocket};
use prost::Message as _;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use wa_rs_binary::node::Node;
use wa_rs_proto::whatsapp::{ClientPayload, DeviceProps};

use crate::content::summarize;
use crate::iq::{self, UserFacts};
use crate::media;
use crate::noise::{FrameReader, Responder, frame};
use crate::server::Shared;
use crate::signal::{self, SignedPreKeyPublic};
use crate::stanza::{self, Address, attr, child_bytes, iq_error, iq_result};
use crate::world::{
    ConnId, DeviceReceipt, Link, Outbound, PairCodeHello, PairingConn, ReceivedMessage, Registration, World, random_token,
};

/// Clients must finish the handshake within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);
/// How many QR refs a registering client gets (WhatsApp sends six).
const QR_REFS: usize = 6;

enum Peer {
    /// Registered, not linked yet: shows QR codes or a pair code.
    Pairing,
    /// A linked device, logged in.
    Device { phone: String, device: u16 },
    /// Refused; the connection is closing.
    Refused,
}

struct Conn {
    id: ConnId,
    tx: mpsc::UnboundedSender<Outbound>,
    peer: Peer,
}

impl Conn {
    fn send(&self, node: Node) {
        let _ = self.tx.send(Outbound::Node(node));
    }
}

pub async fn serve(shared: Arc<Shared>, socket: WebSocket) {
    if let Err(e) = run(&shared, socket).await {
        debug!(error = %e, "connection ended with an error");
    }
}

async fn read_frame(socket: &mut WebSocket, reader: &mut FrameReader) -> anyhow::Result<Vec<u8>> {
    let read = async {
        loop {
            if let Some(f) = reader.next_frame()? {
                return Ok(f);
            }
            match socket.recv().await {
                Some(Ok(WsMessage::Binary(data))) => reader.feed(&data),
                Some(Ok(WsMessage::Close(_))) | None => anyhow::bail!("closed during the handshake"),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
            }
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, read)
        .await
        .map_err(|_| anyhow::anyhow!("handshake timed out"))?
}

async fn run(shared: &Arc<Shared>, mut socket: WebSocket) -> anyhow::Result<()> {
    let mut reader = FrameReader::new();
    let hello = read_frame(&mut socket, &mut reader).await?;
    let (responder, server_hello) = Responder::respond(&shared.identity, &hello)?;
    socket.send(WsMessage::Binary(frame(&server_hello)?.into())).await?;
    let finish = read_frame(&mut socket, &mut reader).await?;
    let est = responder.finish(&finish)?;
    let mut cipher = est.transport;

    let (tx, mut rx) = mpsc::unbounded_channel();
    let id = shared.world.lock().await.next_conn_id();
    let mut conn = Conn {
        id,
        tx,
        peer: Peer::Refused,
    };
    conn.peer = admit(shared, &conn, &est.payload, est.client_static).await;
    shared.bump();

    let result = async {
        loop {
            tokio::select! {
                incoming = socket.recv() => match incoming {
                    Some(Ok(WsMessage::Binary(data))) => {
                        reader.feed(&data);
                        while let Some(f) = reader.next_frame()? {
                            let plain = cipher.decrypt(&f)?;
                            let node = stanza::decode(&plain)?;
                            handle(shared, &mut conn, node).await;
                        }
                    }
                    Some(Ok(WsMessage::Close(_))) | None => return Ok(()),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(anyhow::Error::from(e)),
                },
                out = rx.recv() => match out {
                    Some(Outbound::Node(n)) => {
                        let ct = cipher.encrypt(&stanza::encode(&n)?)?;
                        socket.send(WsMessage::Binary(frame(&ct)?.into())).await?;
                    }
                    Some(Outbound::Close) | None => {
                        let _ = socket.send(WsMessage::Close(None)).await;
                        return Ok(());
                    }
                },
            }
        }
    }
    .await;
    detach(shared, &conn).await;
    shared.bump();
    result
}

/// Decides what this connection is: a registration (new device) or a login.
async fn admit(shared: &Shared, conn: &Conn, payload: &ClientPayload, client_static: [u8; 32]) -> Peer {
    if let Some(reg) = &payload.device_pairing_data {
        let key = |b: &Option<Vec<u8>>| b.as_deref().and_then(|b| <[u8; 32]>::try_from(b).ok());
        let int = |b: &Option<Vec<u8>>| b.as_deref().map(|b| b.iter().fold(0u32, |a, x| (a << 8) | u32::from(*x)));
        let platform = reg
            .device_props
            .as_deref()
            .and_then(|p| DeviceProps::decode(p).ok())
            .and_then(|p| p.os)
            .unwrap_or_else(|| "Unknown".into());
        let (Some(identity_public), Some(registration_id), Some(spk_id), Some(spk_public), Some(spk_sig)) = (
            key(&reg.e_ident),
            int(&reg.e_regid),
            int(&reg.e_skey_id),
            key(&reg.e_skey_val),
            reg.e_skey_sig.clone().filter(|s| s.len() == 64),
        ) else {
            warn!(conn = conn.id, "registration payload is incomplete");
            conn.send(stanza::failure(400));
            let _ = conn.tx.send(Outbound::Close);
            return Peer::Refused;
        };
        let refs: Vec<String> = (0..QR_REFS).map(|_| format!("2@{}", random_token(40))).collect();
        let pairing = PairingConn {
            tx: conn.tx.clone(),
            registration: Registration {
                noise_public: client_static,
                identity_public,
                registration_id,
                signed_prekey: SignedPreKeyPublic {
                    id: spk_id,
                    public: spk_public,
                    signature: spk_sig,
                },
                platform,
            },
            refs: refs.clone(),
            pair_code: None,
            finish_waiter: None,
            link: None,
        };
        shared.world.lock().await.pairing.insert(conn.id, pairing);
        conn.send(stanza::pair_device(&random_token(12), &refs));
        info!(conn = conn.id, "new device registering; QR refs sent");
        return Peer::Pairing;
    }

    let phone = payload.username.map(|u| u.to_string()).unwrap_or_default();
    let device = payload.device.and_then(|d| u16::try_from(d).ok()).unwrap_or(0);
    let mut world = shared.world.lock().await;
    let account_info = world.accounts.get(&phone).map(|a| (a.lid.clone(), a.push_name.clone()));
    let Some((lid, push_name)) = account_info else {
        drop(world);
        return refuse(conn, &phone, device, "unknown account");
    };
    let Some(companion) = world.companion_mut(&phone, device) else {
        drop(world);
        return refuse(conn, &phone, device, "device is not linked");
    };
    if companion.registration.noise_public != client_static {
        drop(world);
        return refuse(conn, &phone, device, "noise key differs from the linked device's");
    }
    if let Some(old) = companion.link.take() {
        // One connection per device: the newer one wins, as on WhatsApp.
        let _ = old.tx.send(Outbound::Node(stanza::stream_conflict("replaced")));
        let _ = old.tx.send(Outbound::Close);
    }
    companion.link = Some(Link {
        conn: conn.id,
        tx: conn.tx.clone(),
        active: false,
    });
    let lid_device = format!("{}:{device}@{}", lid.split('@').next().unwrap_or(""), stanza::LID_SERVER);
    drop(world);
    conn.send(stanza::success(&lid_device, &push_name));
    if !push_name.is_empty() {
        conn.send(stanza::account_sync_push_name(&random_token(10), &push_name));
    }
    info!(conn = conn.id, %phone, device, "device logged in");
    Peer::Device { phone, device }
}

fn refuse(conn: &Conn, phone: &str, device: u16, why: &str) -> Peer {
    info!(conn = conn.id, %phone, device, why, "login refused (401)");
    conn.send(stanza::failure(401));
    let _ = conn.tx.send(Outbound::Close);
    Peer::Refused
}

async fn detach(shared: &Shared, conn: &Conn) {
    let mut world = shared.world.lock().await;
    match &conn.peer {
        Peer::Pairing => {
            if let Some(p) = world.pairing.remove(&conn.id)
                && let Some(mut link) = p.link
                && let Some(w) = link.waiter.take()
            {
                let _ = w.send(Err("the device disconnected before confirming".into()));
            }
        }
        Peer::Device { phone, device } => {
            if let Some(c) = world.companion_mut(phone, *device)
                && c.link.as_ref().is_some_and(|l| l.conn == conn.id)
            {
                c.link = None;
            }
        }
        Peer::Refused => {}
    }
}

async fn handle(shared: &Shared, conn: &mut Conn, node: Node) {
    match node.tag.as_str() {
        "iq" => handle_iq(shared, conn, &node).await,
        "message" => {
            if let Peer::Device { phone, device } = &conn.peer {
                let (phone, device) = (phone.clone(), *device);
                handle_message(shared, conn, &phone, device, &node).await;
            }
        }
        "receipt" => {
            if let Peer::Device { phone, device } = &conn.peer {
                let receipt = DeviceReceipt {
                    id: attr(&node, "id").unwrap_or_default(),
                    account: phone.clone(),
                    device: *device,
                    chat: attr(&node, "to").unwrap_or_default(),
                    kind: attr(&node, "type").unwrap_or_else(|| "delivery".into()),
                    at: chrono::Utc::now(),
                };
                let to = receipt.chat.clone();
                debug!(id = %receipt.id, kind = %receipt.kind, "device sent a receipt");
                shared.world.lock().await.device_receipts.push(receipt);
                conn.send(stanza::ack("receipt", &attr(&node, "id").unwrap_or_default(), &to));
                shared.bump();
            }
        }
        // Presence, chat states, acks of our stanzas, unified-session markers: nothing to do.
        other => debug!(tag = other, "ignored stanza"),
    }
}

async fn handle_iq(shared: &Shared, conn: &mut Conn, node: &Node) {
    let id = attr(node, "id").unwrap_or_default();
    let kind = attr(node, "type").unwrap_or_default();
    if kind == "result" || kind == "error" {
        handle_iq_response(shared, conn, node, &kind == "result").await;
        return;
    }
    let xmlns = attr(node, "xmlns").unwrap_or_default();
    let first = stanza::children(node).first().map(|c| c.tag.clone()).unwrap_or_default();
    let reply = match (&conn.peer, xmlns.as_str(), first.as_str()) {
        (_, "w:p", _) => Some(iq_result(&id, vec![])),
        (Peer::Pairing, "md", "link_code_companion_reg") => Some(pair_code_stage(shared, conn, node, &id).await),
        (Peer::Device { phone, device }, ..) => {
            let (phone, device) = (phone.clone(), *device);
            device_iq(shared, conn, &phone, device, node, &id, &xmlns, &first).await
        }
        _ => Some(iq_error(&id, 401, "not-authorized")),
    };
    if let Some(reply) = reply {
        conn.send(reply);
    }
}

/// Answers to the server's own queries: only the pairing handshake expects any.
async fn handle_iq_response(shared: &Shared, conn: &mut Conn, node: &Node, ok: bool) {
    if !matches!(conn.peer, Peer::Pairing) {
        return;
    }
    let id = attr(node, "id").unwrap_or_default();
    let mut world = shared.world.lock().await;
    let World { pairing, accounts, .. } = &mut *world;
    let Some(p) = pairing.get_mut(&conn.id) else { return };
    let Some(link) = p.link.as_mut().filter(|l| l.iq_id == id) else {
        return; // the ack of pair-device
    };
    let outcome = (|| {
        if !ok {
            return Err(format!("device refused the identity: {}", describe_error(node)));
        }
        let signed = node
            .get_optional_child_by_tag(&["pair-device-sign", "device-identity"])
            .and_then(stanza::bytes)
            .ok_or("pair-device-sign has no device-identity")?;
        let account = accounts.get_mut(&link.phone).ok_or("account vanished")?;
        let key_index = crate::adv::verify_countersigned(
            signed,
            &link.details,
            &account.phone_device.identity_public(),
            &p.registration.identity_public,
        )
        .map_err(|e| e.to_string())?;
        account.companions.insert(
            link.device,
            crate::world::Companion {
                id: link.device,
                registration: p.registration.clone(),
                key_index,
                signed_identity: signed.to_vec(),
                prekeys: Default::default(),
                link: None,
                queue: Vec::new(),
                linked_at: chrono::Utc::now(),
            },
        );
        Ok(Address::device_jid(&link.phone, link.device))
    })();
    if outcome.is_ok() {
        info!(conn = conn.id, phone = %link.phone, device = link.device, "device linked; restarting its stream (515)");
        // The device reconnects and logs in with its new identity.
        conn.send(stanza::stream_error("515"));
        let _ = conn.tx.send(Outbound::Close);
    } else {
        conn.send(stanza::stream_error("401"));
        let _ = conn.tx.send(Outbound::Close);
    }
    if let Some(w) = link.waiter.take() {
        let _ = w.send(outcome);
    }
    // Linked (or refused) for good: its QR refs and pair code are no longer on offer.
    pairing.remove(&conn.id);
    drop(world);
    shared.bump();
}

fn describe_error(node: &Node) -> String {
    node.get_optional_child("error")
        .map(|e| format!("{} {}", attr(e, "code").unwrap_or_default(), attr(e, "text").unwrap_or_default()))
        .unwrap_or_else(|| "no reason".into())
}

/// Pair-code linking, the device's two steps.
async fn pair_code_stage(shared: &Shared, conn: &Conn, node: &Node, id: &str) -> Node {
    let Some(reg) = node.get_optional_child("link_code_companion_reg") else {
        return iq_error(id, 400, "bad-request");
    };
    let stage = attr(reg, "stage").unwrap_or_default();
    let mut world = shared.world.lock().await;
    let Some(p) = world.pairing.get_mut(&conn.id) else {
        return iq_error(id, 400, "bad-request");
    };
    match stage.as_str() {
        "companion_hello" => {
            let phone = attr(reg, "jid").and_then(|j| crate::world::phone_digits(&j));
            let wrapped = child_bytes(reg, "link_code_pairing_wrapped_companion_ephemeral_pub");
            let server_key = child_bytes(reg, "companion_server_auth_key_pub");
            let (Some(phone), Some(wrapped)) = (phone, wrapped.filter(|w| w.len() == 80)) else {
                return iq_error(id, 400, "bad-request");
            };
            if server_key.is_some_and(|k| k != p.registration.noise_public) {
                return iq_error(id, 400, "bad-request");
            }
            let pairing_ref = random_token(32);
            p.pair_code = Some(PairCodeHello {
                phone: phone.clone(),
                wrapped_ephemeral: wrapped.to_vec(),
                pairing_ref: pairing_ref.clone(),
            });
            info!(conn = conn.id, %phone, "pair code requested");
            drop(world);
            shared.bump();
            iq_result(
                id,
                vec![wa_rs_binary::builder::NodeBuilder::new("link_code_companion_reg")
                    .children([wa_rs_binary::builder::NodeBuilder::new("link_code_pairing_ref")
                        .bytes(pairing_ref.into_bytes())
                        .build()])
                    .build()],
            )
        }
        "companion_finish" => {
            let bundle = child_bytes(reg, "link_code_pairing_wrapped_key_bundle").map(<[u8]>::to_vec);
            let ref_ok = p
                .pair_code
                .as_ref()
                .is_some_and(|h| child_bytes(reg, "link_code_pairing_ref") == Some(h.pairing_ref.as_bytes()));
            match (bundle, ref_ok, p.finish_waiter.take()) {
                (Some(b), true, Some(w)) => {
                    let _ = w.send(b);
                    iq_result(id, vec![])
                }
                _ => iq_error(id, 400, "bad-request"),
            }
        }
        _ => iq_error(id, 400, "bad-request"),
    }
}

#[allow(clippy::too_many_arguments)]
async fn device_iq(
    shared: &Shared,
    conn: &Conn,
    phone: &str,
    device: u16,
    node: &Node,
    id: &str,
    xmlns: &str,
    first: &str,
) -> Option<Node> {
    let mut world = shared.world.lock().await;
    if world.companion_mut(phone, device).is_none() {
        // Removed while connected (logout); the stream is about to close.
        return Some(iq_error(id, 401, "not-authorized"));
    }
    Some(match (xmlns, first) {
        ("encrypt", "count") => {
            let n = world.companion_mut(phone, device).map(|c| c.prekeys.len()).unwrap_or(0);
            iq_result(
                id,
                vec![wa_rs_binary::builder::NodeBuilder::new("count").attr("value", n.to_string()).build()],
            )
        }
        ("encrypt", "key") => prekey_fetch(shared, &mut world, node, id),
        ("encrypt", "digest") => iq_result(id, vec![wa_rs_binary::builder::NodeBuilder::new("digest").build()]),
        ("encrypt", _) if attr(node, "type").as_deref() == Some("set") => match iq::parse_prekey_upload(node) {
            Ok(up) => {
                let Some(c) = world.companion_mut(phone, device) else {
                    return Some(iq_error(id, 401, "not-authorized"));
                };
                if up.identity != c.registration.identity_public {
                    return Some(iq_error(id, 406, "not-acceptable"));
                }
                c.registration.registration_id = up.registration_id;
                c.registration.signed_prekey = up.signed_prekey;
                let n = up.prekeys.len();
                c.prekeys.extend(up.prekeys);
                debug!(phone, device, n, "prekeys uploaded");
                drop(world);
                shared.bump();
                iq_result(id, vec![])
            }
            Err(why) => {
                warn!(phone, device, why, "bad prekey upload");
                iq_error(id, 400, "bad-request")
            }
        },
        ("usync", _) => {
            let facts: Vec<UserFacts> = iq::usync_subjects(node)
                .iter()
                .map(|s| user_facts(shared, &mut world, s))
                .collect();
            iq::usync_result(node, &facts)
        }
        // A/B properties, blocklist and privacy settings: empty but well-formed answers (or,
        // when configured, the refusal of an emulator that does not implement them).
        ("abt", "props") | ("blocklist", _) | ("privacy", "privacy") if shared.config.refuse_init_queries => {
            iq_error(id, 501, "feature-not-implemented")
        }
        ("abt", "props") => iq_result(
            id,
            vec![wa_rs_binary::builder::NodeBuilder::new("props")
                .attrs([("protocol", "1"), ("hash", "emulator"), ("refresh", "86400"), ("delta_update", "false")])
                .build()],
        ),
        ("blocklist", _) if attr(node, "type").as_deref() == Some("get") => {
            iq_result(id, vec![wa_rs_binary::builder::NodeBuilder::new("list").build()])
        }
        ("privacy", "privacy") if attr(node, "type").as_deref() == Some("get") => iq_result(
            id,
            vec![wa_rs_binary::builder::NodeBuilder::new("privacy")
                .children(["last", "online", "profile", "status", "readreceipts", "groupadd"].map(|name| {
                    wa_rs_binary::builder::NodeBuilder::new("category")
                        .attrs([("name", name), ("value", if name == "readreceipts" { "all" } else { "contacts" })])
                        .build()
                }))
                .build()],
        ),
        ("w:m", "media_conn") => iq::media_conn_result(id, &world.media_auth.clone(), &shared.config.media_host),
        ("passive", "active") => {
            let Some(c) = world.companion_mut(phone, device) else {
                return Some(iq_error(id, 401, "not-authorized"));
            };
            let queued = std::mem::take(&mut c.queue);
            if let Some(l) = c.link.as_mut() {
                l.active = true;
            }
            drop(world);
            // The answer first, then what waited, then the end-of-offline marker.
            conn.send(iq_result(id, vec![]));
            let n = queued.len();
            for mut q in queued {
                q.attrs.insert("offline".into(), "1");
                conn.send(q);
            }
            conn.send(stanza::offline_done(n));
            shared.bump();
            // Already answered above.
            return None;
        }
        ("passive", "passive") => {
            if let Some(l) = world.companion_mut(phone, device).and_then(|c| c.link.as_mut()) {
                l.active = false;
            }
            iq_result(id, vec![])
        }
        ("md", "remove-companion-device") => {
            let target = node
                .get_optional_child("remove-companion-device")
                .and_then(|n| attr(n, "jid"))
                .and_then(|j| Address::parse(&j));
            match target {
                Some(t) if t.user == phone => {
                    let removed = world
                        .accounts
                        .get_mut(phone)
                        .and_then(|a| a.companions.remove(&t.device))
                        .is_some();
                    if !removed {
                        return Some(iq_error(id, 404, "item-not-found"));
                    }
                    info!(phone, device = t.device, by = device, "device unlinked by request");
                    drop(world);
                    shared.bump();
                    if t.device == device {
                        // The device logs itself out; close the stream if it lingers.
                        let tx = conn.tx.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_secs(2)).await;
                            let _ = tx.send(Outbound::Close);
                        });
                    }
                    iq_result(id, vec![])
                }
                _ => iq_error(id, 403, "forbidden"),
            }
        }
        _ => {
            debug!(xmlns, first, "unimplemented query");
            iq_error(id, 501, "feature-not-implemented")
        }
    })
}

fn user_facts(shared: &Shared, world: &mut World, subject: &str) -> UserFacts {
    let Some(phone) = crate::world::phone_digits(subject) else {
        return UserFacts {
            jid: subject.to_owned(),
            registered: false,
            lid: None,
            devices: vec![],
            status: None,
        };
    };
    if shared.config.auto_register_contacts && !world.accounts.contains_key(&phone) {
        world.account_or_create(&phone, None);
    }
    match world.accounts.get(&phone) {
        Some(a) => UserFacts {
            jid: a.jid(),
            registered: true,
            lid: Some(a.lid.clone()),
            devices: std::iter::once((0, None))
                .chain(a.companions.values().map(|c| (c.id, Some(c.key_index))))
                .collect(),
            status: Some("Hey there! I am using WhatsApp.".into()),
        },
        None => UserFacts {
            jid: Address::user_jid(&phone),
            registered: false,
            lid: None,
            devices: vec![],
            status: None,
        },
    }
}

fn prekey_fetch(shared: &Shared, world: &mut World, node: &Node, id: &str) -> Node {
    let answers: Vec<_> = iq::prekey_subjects(node)
        .into_iter()
        .map(|jid| {
            let bundle = Address::parse(&jid).and_then(|a| {
                if shared.config.auto_register_contacts && a.device == 0 && !world.accounts.contains_key(&a.user) {
                    crate::world::phone_digits(&a.user)?;
                    world.account_or_create(&a.user, None);
                }
                let account = world.accounts.get_mut(&a.user)?;
                if a.device == 0 {
                    Some((account.phone_device.fresh_bundle(), None))
                } else {
                    let c = account.companions.get_mut(&a.device)?;
                    let identity = c.signed_identity.clone();
                    Some((c.take_bundle(), Some(identity)))
                }
            });
            (jid, bundle)
        })
        .collect();
    iq::prekey_result(id, &answers)
}

/// A message a linked device sent: each part is decrypted by the simulated phone it is for.
async fn handle_message(shared: &Shared, conn: &Conn, phone: &str, device: u16, node: &Node) {
    let id = attr(node, "id").unwrap_or_default();
    let chat = attr(node, "to").unwrap_or_default();
    let sender = signal::address(phone, device);
    let mut recipients_to_receipt = Vec::new();
    let mut world = shared.world.lock().await;
    for part in stanza::enc_parts(node) {
        let Some(to) = Address::parse(&part.to) else { continue };
        if to.device != 0 {
            // Only phones are simulated; other linked devices would need a real client.
            debug!(to = %part.to, "message part for a linked device dropped");
            continue;
        }
        let Some(account) = world.accounts.get_mut(&to.user) else {
            debug!(to = %part.to, "message part for an unknown account dropped");
            continue;
        };
        let mut received = ReceivedMessage {
            id: id.clone(),
            from: phone.to_owned(),
            from_device: device,
            to: to.user.clone(),
            kind: "undecryptable".into(),
            text: None,
            caption: None,
            mimetype: None,
            filename: None,
            media: None,
            media_error: None,
            reply_to: None,
            sent_to: None,
            error: None,
            enc_type: part.kind.clone(),
            received_at: chrono::Utc::now(),
        };
        match account.phone_device.decrypt(&sender, &part.kind, &part.ciphertext).await {
            Ok(padded) => match signal::unpad(&padded).map(wa_rs_proto::whatsapp::Message::decode) {
                Some(Ok(msg)) => {
                    let s = summarize(&msg);
                    received.kind = s.kind;
                    received.text = s.text;
                    received.caption = s.caption;
                    received.reply_to = s.reply_to;
                    received.sent_to = s.sent_to;
                    if let Some(m) = s.media {
                        received.mimetype = m.mimetype.clone();
                        received.filename = m.filename.clone();
                        match fetch_and_open(&world.blobs, &m) {
                            Ok(bytes) => received.media = Some(bytes),
                            Err(e) => received.media_error = Some(e),
                        }
                    }
                }
                Some(Err(e)) => received.error = Some(format!("not a Message protobuf: {e}")),
                None => received.error = Some("bad padding".into()),
            },
            Err(e) => received.error = Some(format!("signal: {e}")),
        }
        if received.error.is_some() {
            warn!(%id, from = phone, to = %to.user, error = ?received.error, "could not decrypt a message part");
        } else {
            debug!(%id, from = phone, to = %to.user, kind = %received.kind, "message decrypted");
        }
        if to.user != phone && received.error.is_none() {
            recipients_to_receipt.push(to.user.clone());
        }
        world.received.push(received);
    }
    // The server took the message.
    conn.send(stanza::ack("message", &id, &chat));
    if shared.config.auto_delivery_receipts {
        let account = world.accounts.get_mut(phone);
        if let Some(account) = account {
            for r in recipients_to_receipt {
                let node = stanza::receipt(&Address::user_jid(&r), &id, None);
                for c in account.companions.values_mut() {
                    c.deliver(node.clone());
                }
            }
        }
    }
    drop(world);
    shared.bump();
}

fn fetch_and_open(blobs: &std::collections::HashMap<String, Vec<u8>>, m: &crate::content::MediaRef) -> Result<Vec<u8>, String> {
    let path = m
        .direct_path
        .as_deref()
        .map(|p| p.split('?').next().unwrap_or(p))
        .ok_or("message has no direct path")?;
    let blob = blobs.get(path).ok_or_else(|| format!("no upload at {path}"))?;
    media::open(
        blob,
        m.kind,
        &media::Expected {
            media_key: &m.media_key,
            file_enc_sha256: m.file_enc_sha256.as_deref(),
            file_sha256: m.file_sha256.as_deref(),
            file_length: m.file_length,
        },
    )
    .map_err(|e| e.to_string())
}
