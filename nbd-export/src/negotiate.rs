//! The server side of option haggling as a state machine without I/O.
//!
//! The server loop reads an option header and its (bounded) payload, hands them to
//! [`Negotiation::handle`], writes out the bytes it appended, and continues with the
//! [`Step`] it returned: more options, the transmission phase with a [`Session`], or a
//! close. Each state consumes itself, so a finished negotiation cannot be reused.
//! Option errors are `NBD_REP_ERR_*` replies, never a disconnect, except where the
//! protocol leaves no other way (EXPORT_NAME of an unknown export, ABORT).

use std::sync::Arc;

use crate::export::{Export, MetaContext};
use crate::proto::{
    self, encode_option_reply, info, rep, tflags, ClientOption, HeaderMode, InfoRequest,
    MetaRequest,
};
use crate::tls::Scope;

/// Where the negotiation finds exports by name.
pub trait ExportDirectory {
    /// The export called `name` and its canonical name. The empty name selects the
    /// default export (the only one, when exactly one is served).
    fn lookup(&self, name: &str) -> Option<(String, Arc<dyn Export>)>;
    /// Every export's name and description, for NBD_OPT_LIST.
    fn list(&self) -> Vec<(String, String)>;
}

/// What the transmission phase needs: the export and what was negotiated.
#[derive(Clone)]
pub struct Session {
    /// The export's canonical name.
    pub name: String,
    /// The export.
    pub export: Arc<dyn Export>,
    /// Reply (and request) header style.
    pub mode: HeaderMode,
    /// Selected metadata contexts with their ids, in selection order.
    pub contexts: Vec<(u32, MetaContext)>,
    /// Transmission flags sent to the client.
    pub flags: u16,
    /// Export size at negotiation.
    pub size: u64,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("name", &self.name)
            .field("mode", &self.mode)
            .field("contexts", &self.contexts)
            .field("flags", &format_args!("{:#x}", self.flags))
            .field("size", &self.size)
            .finish()
    }
}

/// Why a handshake cannot start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NegotiationError {
    /// The client sent flags the server did not offer.
    #[error("client flags {0:#x} include flags the server did not offer; closing as the protocol requires")]
    UnknownClientFlags(u32),
    /// The client does not speak fixed newstyle.
    #[error("client did not set NBD_FLAG_C_FIXED_NEWSTYLE; only fixed newstyle negotiation is supported")]
    NotFixedNewstyle,
}

/// Where the negotiation goes after an option.
#[derive(Debug)]
pub enum Step {
    /// Keep haggling.
    Options(Negotiation),
    /// Enter transmission.
    Transmit(Session),
    /// Close the connection (after writing the appended bytes, if any).
    Close,
    /// STARTTLS was acknowledged: run the TLS handshake, then continue with
    /// [`Negotiation::tls_established`].
    StartTls(Negotiation),
}

/// Where a connection stands with TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TlsState {
    /// The server has no TLS: STARTTLS is unsupported.
    Off,
    /// FORCEDTLS: nothing but STARTTLS and ABORT before TLS is up.
    Required,
    /// TLS is up; the client may open exports within this scope.
    Established(Scope),
}

/// The option-haggling state of one connection.
#[derive(Debug, Clone)]
pub struct Negotiation {
    no_zeroes: bool,
    mode: HeaderMode,
    /// Contexts chosen by SET_META_CONTEXT and the export they were chosen for.
    selected: Option<(String, Vec<MetaContext>)>,
    tls: TlsState,
}

/// The handshake flags this server offers.
pub const SERVER_HANDSHAKE_FLAGS: u16 = proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES;

/// The transmission flags for an export in a header mode.
pub fn transmission_flags(export: &dyn Export, mode: HeaderMode) -> u16 {
    let caps = export.capabilities();
    let mut flags = tflags::HAS_FLAGS;
    if caps.read_only {
        flags |= tflags::READ_ONLY | tflags::CAN_MULTI_CONN;
        // A read-only export that accepts TRIM (a backup's snapshot releasing what its
        // client is done with) says so; its data stay read-only.
        if caps.trim {
            flags |= tflags::SEND_TRIM;
        }
    } else {
        if caps.trim {
            flags |= tflags::SEND_TRIM;
        }
        if caps.write_zeroes {
            flags |= tflags::SEND_WRITE_ZEROES;
            if caps.fast_zero {
                flags |= tflags::SEND_FAST_ZERO;
            }
        }
        if caps.multi_conn {
            flags |= tflags::CAN_MULTI_CONN;
        }
    }
    if caps.flush {
        flags |= tflags::SEND_FLUSH | tflags::SEND_FUA;
    }
    if caps.cache {
        flags |= tflags::SEND_CACHE;
    }
    if mode >= HeaderMode::Structured {
        flags |= tflags::SEND_DF;
    }
    flags
}

/// The contexts an export offers.
pub fn offered_contexts(export: &dyn Export) -> Vec<MetaContext> {
    let mut all = vec![MetaContext::BaseAllocation];
    all.extend(
        export
            .dirty_bitmaps()
            .into_iter()
            .map(MetaContext::DirtyBitmap),
    );
    all
}

/// The contexts matching one query. `list` enables the wildcard queries that
/// LIST_META_CONTEXT accepts (`base:`, `qemu:`, `qemu:dirty-bitmap:`).
pub fn match_query(offered: &[MetaContext], query: &str, list: bool) -> Vec<MetaContext> {
    offered
        .iter()
        .filter(|ctx| {
            let name = ctx.wire_name();
            if name == query {
                return true;
            }
            if !list {
                return false;
            }
            match ctx {
                MetaContext::BaseAllocation => query == "base:",
                MetaContext::DirtyBitmap(_) => query == "qemu:" || query == "qemu:dirty-bitmap:",
            }
        })
        .cloned()
        .collect()
}

impl Negotiation {
    /// The greeting the server sends first.
    pub fn greeting() -> [u8; proto::GREETING_LEN] {
        proto::encode_greeting(SERVER_HANDSHAKE_FLAGS)
    }

    /// Start after reading the client's flags.
    pub fn start(client_flags: u32) -> Result<Negotiation, NegotiationError> {
        let known = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;
        if client_flags & !known != 0 {
            return Err(NegotiationError::UnknownClientFlags(client_flags));
        }
        if client_flags & proto::FLAG_C_FIXED_NEWSTYLE == 0 {
            return Err(NegotiationError::NotFixedNewstyle);
        }
        Ok(Negotiation {
            no_zeroes: client_flags & proto::FLAG_C_NO_ZEROES != 0,
            mode: HeaderMode::Simple,
            selected: None,
            tls: TlsState::Off,
        })
    }

    /// FORCEDTLS mode (the NBD spec's name): before STARTTLS every option but STARTTLS
    /// and ABORT gets NBD_REP_ERR_TLS_REQD, and EXPORT_NAME closes the connection.
    pub fn require_tls(mut self) -> Negotiation {
        self.tls = TlsState::Required;
        self
    }

    /// The TLS handshake after STARTTLS succeeded and the client may open the exports
    /// in `scope`. Haggling starts afresh, as the protocol asks.
    pub fn tls_established(mut self, scope: Scope) -> Negotiation {
        self.mode = HeaderMode::Simple;
        self.selected = None;
        self.tls = TlsState::Established(scope);
        self
    }

    fn allows(&self, export: &str) -> bool {
        match &self.tls {
            TlsState::Established(scope) => scope.allows(export),
            TlsState::Off | TlsState::Required => true,
        }
    }

    fn refuse_policy(option: u32, name: &str, out: &mut Vec<u8>) {
        let message = format!("this client's identity may not open export {name:?}");
        encode_option_reply(out, option, rep::ERR_POLICY, message.as_bytes());
    }

    /// The header mode negotiated so far.
    pub fn mode(&self) -> HeaderMode {
        self.mode
    }

    /// Answer an option whose payload was too big to read (it was discarded).
    pub fn refuse_too_big(self, option: u32, out: &mut Vec<u8>) -> Step {
        encode_option_reply(out, option, rep::ERR_TOO_BIG, b"option payload too large");
        Step::Options(self)
    }

    /// Answer an option that arrives while the server shuts down: ABORT is acknowledged,
    /// EXPORT_NAME (which cannot fail softly) ends the session, and everything else gets
    /// NBD_REP_ERR_SHUTDOWN, after which the client must disconnect.
    pub fn refuse_shutting_down(self, option: u32, out: &mut Vec<u8>) -> Step {
        match option {
            proto::opt::ABORT => {
                encode_option_reply(out, option, rep::ACK, &[]);
                Step::Close
            }
            proto::opt::EXPORT_NAME => Step::Close,
            _ => {
                encode_option_reply(
                    out,
                    option,
                    rep::ERR_SHUTDOWN,
                    b"the server is shutting down",
                );
                Step::Options(self)
            }
        }
    }

    /// Handle one option; append the reply bytes to `out`.
    pub fn handle(
        mut self,
        option: u32,
        data: &[u8],
        directory: &dyn ExportDirectory,
        out: &mut Vec<u8>,
    ) -> Step {
        if self.tls == TlsState::Required {
            match option {
                proto::opt::STARTTLS | proto::opt::ABORT => {}
                // EXPORT_NAME cannot fail softly: the protocol says to close.
                proto::opt::EXPORT_NAME => return Step::Close,
                _ => {
                    encode_option_reply(
                        out,
                        option,
                        rep::ERR_TLS_REQD,
                        b"this server requires TLS: send NBD_OPT_STARTTLS first",
                    );
                    return Step::Options(self);
                }
            }
        }
        let parsed = match proto::parse_option(option, data) {
            Ok(parsed) => parsed,
            Err(err) => {
                encode_option_reply(out, option, rep::ERR_INVALID, err.to_string().as_bytes());
                return Step::Options(self);
            }
        };
        match parsed {
            ClientOption::ExportName(name) => match directory.lookup(&name) {
                Some((name, export)) if self.allows(&name) => {
                    let session = self.session(name, export);
                    out.extend_from_slice(&session.size.to_be_bytes());
                    out.extend_from_slice(&session.flags.to_be_bytes());
                    if !self.no_zeroes {
                        out.extend_from_slice(&[0u8; 124]);
                    }
                    Step::Transmit(session)
                }
                // EXPORT_NAME cannot fail softly: the protocol says to close.
                _ => Step::Close,
            },
            ClientOption::Abort => {
                encode_option_reply(out, option, rep::ACK, &[]);
                Step::Close
            }
            ClientOption::List => {
                for (name, description) in directory.list() {
                    if !self.allows(&name) {
                        continue;
                    }
                    encode_option_reply(
                        out,
                        option,
                        rep::SERVER,
                        &proto::encode_rep_server(&name, &description),
                    );
                }
                encode_option_reply(out, option, rep::ACK, &[]);
                Step::Options(self)
            }
            ClientOption::StartTls => match self.tls {
                TlsState::Off => {
                    encode_option_reply(
                        out,
                        option,
                        rep::ERR_UNSUP,
                        b"TLS is not configured on this server (see --tls-creds)",
                    );
                    Step::Options(self)
                }
                TlsState::Required => {
                    encode_option_reply(out, option, rep::ACK, &[]);
                    Step::StartTls(self)
                }
                TlsState::Established(_) => {
                    encode_option_reply(out, option, rep::ERR_INVALID, b"TLS is already up");
                    Step::Options(self)
                }
            },
            ClientOption::Info(request) => {
                self.info(option, &request, directory, out);
                Step::Options(self)
            }
            ClientOption::Go(request) => match self.info(option, &request, directory, out) {
                Some((name, export)) => Step::Transmit(self.session(name, export)),
                None => Step::Options(self),
            },
            ClientOption::StructuredReply => {
                match self.mode {
                    HeaderMode::Extended => encode_option_reply(
                        out,
                        option,
                        rep::ERR_EXT_HEADER_REQD,
                        b"extended headers already negotiated",
                    ),
                    HeaderMode::Structured => encode_option_reply(
                        out,
                        option,
                        rep::ERR_INVALID,
                        b"structured replies already negotiated",
                    ),
                    HeaderMode::Simple => {
                        self.mode = HeaderMode::Structured;
                        encode_option_reply(out, option, rep::ACK, &[]);
                    }
                }
                Step::Options(self)
            }
            ClientOption::ExtendedHeaders => {
                if self.mode == HeaderMode::Extended {
                    encode_option_reply(
                        out,
                        option,
                        rep::ERR_INVALID,
                        b"extended headers already negotiated",
                    );
                } else {
                    self.mode = HeaderMode::Extended;
                    encode_option_reply(out, option, rep::ACK, &[]);
                }
                Step::Options(self)
            }
            ClientOption::ListMetaContext(request) => {
                self.meta_context(option, &request, true, directory, out);
                Step::Options(self)
            }
            ClientOption::SetMetaContext(request) => {
                self.meta_context(option, &request, false, directory, out);
                Step::Options(self)
            }
            ClientOption::Unknown(code) => {
                encode_option_reply(
                    out,
                    option,
                    rep::ERR_UNSUP,
                    format!("option {code} is not supported").as_bytes(),
                );
                Step::Options(self)
            }
        }
    }

    fn session(&self, name: String, export: Arc<dyn Export>) -> Session {
        let contexts = match &self.selected {
            Some((selected_for, contexts)) if *selected_for == name => contexts
                .iter()
                .enumerate()
                .map(|(i, c)| (i as u32, c.clone()))
                .collect(),
            _ => Vec::new(),
        };
        Session {
            flags: transmission_flags(export.as_ref(), self.mode),
            size: export.size(),
            name,
            export,
            mode: self.mode,
            contexts,
        }
    }

    /// INFO and GO: reply with the information items and ACK; the export when found.
    fn info(
        &self,
        option: u32,
        request: &InfoRequest,
        directory: &dyn ExportDirectory,
        out: &mut Vec<u8>,
    ) -> Option<(String, Arc<dyn Export>)> {
        let Some((name, export)) = directory.lookup(&request.name) else {
            let message = format!("no export named {:?}", request.name);
            encode_option_reply(out, option, rep::ERR_UNKNOWN, message.as_bytes());
            return None;
        };
        if !self.allows(&name) {
            Self::refuse_policy(option, &name, out);
            return None;
        }
        let flags = transmission_flags(export.as_ref(), self.mode);
        encode_option_reply(
            out,
            option,
            rep::INFO,
            &proto::encode_info_export(export.size(), flags),
        );
        if request.items.contains(&info::NAME) {
            encode_option_reply(
                out,
                option,
                rep::INFO,
                &proto::encode_info_text(info::NAME, &name),
            );
        }
        let description = export.description();
        if request.items.contains(&info::DESCRIPTION) && !description.is_empty() {
            let text = truncate(&description, proto::MAX_STRING);
            encode_option_reply(
                out,
                option,
                rep::INFO,
                &proto::encode_info_text(info::DESCRIPTION, text),
            );
        }
        // Always sent: clients that did not ask may still use it, and it tells them the
        // 32 MiB payload limit.
        encode_option_reply(
            out,
            option,
            rep::INFO,
            &proto::encode_info_block_size(1, proto::PREFERRED_BLOCK, proto::MAX_PAYLOAD),
        );
        encode_option_reply(out, option, rep::ACK, &[]);
        Some((name, export))
    }

    fn meta_context(
        &mut self,
        option: u32,
        request: &MetaRequest,
        list: bool,
        directory: &dyn ExportDirectory,
        out: &mut Vec<u8>,
    ) {
        if self.mode == HeaderMode::Simple {
            encode_option_reply(
                out,
                option,
                rep::ERR_INVALID,
                b"negotiate structured replies before metadata contexts",
            );
            return;
        }
        let Some((name, export)) = directory.lookup(&request.name) else {
            let message = format!("no export named {:?}", request.name);
            encode_option_reply(out, option, rep::ERR_UNKNOWN, message.as_bytes());
            return;
        };
        if !self.allows(&name) {
            Self::refuse_policy(option, &name, out);
            return;
        }
        let offered = offered_contexts(export.as_ref());
        let mut chosen: Vec<MetaContext> = Vec::new();
        if request.queries.is_empty() {
            if list {
                chosen = offered;
            }
        } else {
            for query in &request.queries {
                for ctx in match_query(&offered, query, list) {
                    if !chosen.contains(&ctx) {
                        chosen.push(ctx);
                    }
                }
            }
        }
        for (id, ctx) in chosen.iter().enumerate() {
            let id = if list { 0 } else { id as u32 };
            encode_option_reply(
                out,
                option,
                rep::META_CONTEXT,
                &proto::encode_rep_meta_context(id, &ctx.wire_name()),
            );
        }
        encode_option_reply(out, option, rep::ACK, &[]);
        if !list {
            self.selected = Some((name, chosen));
        }
    }
}

fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::{Capabilities, ExportResult, Extent, ZeroFlags};
    use crate::proto::opt;
    use crate::proto::{parse_option_reply_header, OPTION_REPLY_HEADER_LEN};

    struct Disk {
        read_only: bool,
    }

    impl Export for Disk {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities {
                read_only: self.read_only,
                flush: true,
                trim: true,
                write_zeroes: true,
                fast_zero: true,
                cache: false,
                multi_conn: false,
                knows_holes: false,
            }
        }
        fn read(&self, _: u64, _: &mut [u8]) -> ExportResult<()> {
            Ok(())
        }
        fn write(&self, _: u64, _: &[u8], _: bool) -> ExportResult<()> {
            Ok(())
        }
        fn flush(&self) -> ExportResult<()> {
            Ok(())
        }
        fn trim(&self, _: u64, _: u64, _: bool) -> ExportResult<()> {
            Ok(())
        }
        fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> ExportResult<()> {
            Ok(())
        }
        fn dirty_bitmaps(&self) -> Vec<String> {
            vec!["ckpt1".into(), "ckpt2".into()]
        }
        fn block_status(&self, _: &MetaContext, _: u64, len: u64) -> ExportResult<Vec<Extent>> {
            Ok(vec![Extent {
                length: len,
                flags: 0,
            }])
        }
    }

    struct Dir;
    impl ExportDirectory for Dir {
        fn lookup(&self, name: &str) -> Option<(String, Arc<dyn Export>)> {
            match name {
                "" | "disk" => Some(("disk".into(), Arc::new(Disk { read_only: false }))),
                "snap" => Some(("snap".into(), Arc::new(Disk { read_only: true }))),
                _ => None,
            }
        }
        fn list(&self) -> Vec<(String, String)> {
            vec![
                ("disk".into(), String::new()),
                ("snap".into(), "a snapshot".into()),
            ]
        }
    }

    /// Split a reply stream into (reply type, payload).
    fn replies(mut bytes: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let h = parse_option_reply_header(&bytes[..OPTION_REPLY_HEADER_LEN]).unwrap();
            let end = OPTION_REPLY_HEADER_LEN + h.length as usize;
            out.push((h.reply, bytes[OPTION_REPLY_HEADER_LEN..end].to_vec()));
            bytes = &bytes[end..];
        }
        out
    }

    fn run(n: Negotiation, option: u32, data: &[u8]) -> (Step, Vec<(u32, Vec<u8>)>) {
        let mut out = Vec::new();
        let step = n.handle(option, data, &Dir, &mut out);
        (step, replies(&out))
    }

    fn start() -> Negotiation {
        Negotiation::start(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).unwrap()
    }

    fn options(step: Step) -> Negotiation {
        match step {
            Step::Options(n) => n,
            other => panic!("expected more options, got {other:?}"),
        }
    }

    #[test]
    fn unknown_client_flags_and_plain_newstyle_are_refused() {
        assert_eq!(
            Negotiation::start(1 << 5).unwrap_err(),
            NegotiationError::UnknownClientFlags(1 << 5)
        );
        assert_eq!(
            Negotiation::start(0).unwrap_err(),
            NegotiationError::NotFixedNewstyle
        );
    }

    #[test]
    fn unknown_options_and_starttls_get_err_unsup() {
        let (step, r) = run(start(), 99, b"junk");
        assert_eq!(r[0].0, rep::ERR_UNSUP);
        let (_, r) = run(options(step), opt::STARTTLS, b"");
        assert_eq!(r[0].0, rep::ERR_UNSUP);
    }

    #[test]
    fn forcedtls_allows_only_starttls_and_abort_before_tls() {
        let (step, r) = run(start().require_tls(), opt::LIST, b"");
        assert_eq!(r[0].0, rep::ERR_TLS_REQD);
        let req = proto::encode_info_request(&InfoRequest {
            name: "disk".into(),
            items: vec![],
        });
        let (step, r) = run(options(step), opt::GO, &req);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].0, rep::ERR_TLS_REQD);
        let n = options(step);
        let (closed, r) = run(n.clone(), opt::EXPORT_NAME, b"disk");
        assert!(matches!(closed, Step::Close) && r.is_empty());
        let (upgraded, r) = run(n, opt::STARTTLS, b"");
        assert_eq!(r[0].0, rep::ACK);
        let Step::StartTls(n) = upgraded else {
            panic!("STARTTLS must upgrade")
        };
        let (step, r) = run(n.tls_established(Scope::All), opt::GO, &req);
        assert_eq!(r.last().unwrap().0, rep::ACK);
        assert!(matches!(step, Step::Transmit(_)));
    }

    #[test]
    fn a_scoped_identity_sees_and_opens_only_its_exports() {
        let scoped = || start().tls_established(Scope::Exports(vec!["sn*".into()]));
        let (_, r) = run(scoped(), opt::LIST, b"");
        let kinds: Vec<u32> = r.iter().map(|(k, _)| *k).collect();
        assert_eq!(kinds, vec![rep::SERVER, rep::ACK]);
        let go = |name: &str| {
            proto::encode_info_request(&InfoRequest {
                name: name.into(),
                items: vec![],
            })
        };
        let (step, r) = run(scoped(), opt::GO, &go("disk"));
        assert_eq!(r[0].0, rep::ERR_POLICY);
        let (step, r) = run(options(step), opt::GO, &go(""));
        assert_eq!(r[0].0, rep::ERR_POLICY, "the default export is checked too");
        let (_, r) = run(options(step), opt::STARTTLS, b"");
        assert_eq!(r[0].0, rep::ERR_INVALID);
        assert!(matches!(
            run(scoped(), opt::EXPORT_NAME, b"disk").0,
            Step::Close
        ));
        assert!(matches!(
            run(scoped(), opt::GO, &go("snap")).0,
            Step::Transmit(_)
        ));
    }

    #[test]
    fn list_names_every_export_then_acks() {
        let (_, r) = run(start(), opt::LIST, b"");
        let kinds: Vec<u32> = r.iter().map(|(k, _)| *k).collect();
        assert_eq!(kinds, vec![rep::SERVER, rep::SERVER, rep::ACK]);
        assert_eq!(
            proto::parse_rep_server(&r[1].1).unwrap(),
            ("snap".into(), "a snapshot".into())
        );
    }

    #[test]
    fn go_sends_export_info_and_block_size_then_enters_transmission() {
        let req = InfoRequest {
            name: "snap".into(),
            items: vec![info::NAME],
        };
        let (step, r) = run(start(), opt::GO, &proto::encode_info_request(&req));
        let infos: Vec<_> = r
            .iter()
            .filter(|(k, _)| *k == rep::INFO)
            .map(|(_, d)| proto::parse_info_reply(d).unwrap())
            .collect();
        assert!(infos.contains(&proto::InfoReply::Name("snap".into())));
        assert!(infos.contains(&proto::InfoReply::BlockSize {
            minimum: 1,
            preferred: 4096,
            maximum: proto::MAX_PAYLOAD
        }));
        let Step::Transmit(session) = step else {
            panic!("GO must enter transmission")
        };
        assert_ne!(session.flags & tflags::READ_ONLY, 0);
        assert_ne!(session.flags & tflags::CAN_MULTI_CONN, 0);
        assert_eq!(r.last().unwrap().0, rep::ACK);
    }

    #[test]
    fn go_on_an_unknown_export_is_a_soft_error() {
        let req = InfoRequest {
            name: "nope".into(),
            items: vec![],
        };
        let (step, r) = run(start(), opt::GO, &proto::encode_info_request(&req));
        assert_eq!(r[0].0, rep::ERR_UNKNOWN);
        options(step);
    }

    #[test]
    fn export_name_of_an_unknown_export_closes() {
        let (step, _) = run(start(), opt::EXPORT_NAME, b"nope");
        assert!(matches!(step, Step::Close));
    }

    #[test]
    fn meta_contexts_need_structured_replies() {
        let req = MetaRequest {
            name: "disk".into(),
            queries: vec!["base:allocation".into()],
        };
        let (_, r) = run(
            start(),
            opt::SET_META_CONTEXT,
            &proto::encode_meta_request(&req),
        );
        assert_eq!(r[0].0, rep::ERR_INVALID);
    }

    #[test]
    fn list_wildcards_expand_but_set_matches_exactly() {
        let (step, _) = run(start(), opt::STRUCTURED_REPLY, b"");
        let n = options(step);
        let list = MetaRequest {
            name: "disk".into(),
            queries: vec!["qemu:dirty-bitmap:".into(), "base:".into()],
        };
        let (step, r) = run(
            n,
            opt::LIST_META_CONTEXT,
            &proto::encode_meta_request(&list),
        );
        let names: Vec<String> = r
            .iter()
            .filter(|(k, _)| *k == rep::META_CONTEXT)
            .map(|(_, d)| proto::parse_rep_meta_context(d).unwrap().1)
            .collect();
        assert_eq!(
            names,
            vec![
                "qemu:dirty-bitmap:ckpt1",
                "qemu:dirty-bitmap:ckpt2",
                "base:allocation"
            ]
        );

        let set = MetaRequest {
            name: "disk".into(),
            queries: vec![
                "qemu:".into(),
                "qemu:dirty-bitmap:ckpt2".into(),
                "base:allocation".into(),
                "other:x".into(),
            ],
        };
        let (step, r) = run(
            options(step),
            opt::SET_META_CONTEXT,
            &proto::encode_meta_request(&set),
        );
        let chosen: Vec<(u32, String)> = r
            .iter()
            .filter(|(k, _)| *k == rep::META_CONTEXT)
            .map(|(_, d)| proto::parse_rep_meta_context(d).unwrap())
            .collect();
        assert_eq!(
            chosen,
            vec![
                (0, "qemu:dirty-bitmap:ckpt2".into()),
                (1, "base:allocation".into())
            ]
        );

        let go = InfoRequest {
            name: "disk".into(),
            items: vec![],
        };
        let (step, _) = run(options(step), opt::GO, &proto::encode_info_request(&go));
        let Step::Transmit(session) = step else {
            panic!()
        };
        assert_eq!(session.contexts.len(), 2);
        assert_eq!(session.mode, HeaderMode::Structured);
    }

    #[test]
    fn contexts_chosen_for_another_export_are_dropped_at_go() {
        let n = options(run(start(), opt::STRUCTURED_REPLY, b"").0);
        let set = MetaRequest {
            name: "snap".into(),
            queries: vec!["base:allocation".into()],
        };
        let n = options(run(n, opt::SET_META_CONTEXT, &proto::encode_meta_request(&set)).0);
        let go = InfoRequest {
            name: "disk".into(),
            items: vec![],
        };
        let Step::Transmit(session) = run(n, opt::GO, &proto::encode_info_request(&go)).0 else {
            panic!()
        };
        assert!(session.contexts.is_empty());
    }

    #[test]
    fn structured_reply_after_extended_headers_is_refused() {
        let n = options(run(start(), opt::EXTENDED_HEADERS, b"").0);
        assert_eq!(n.mode(), HeaderMode::Extended);
        let (step, r) = run(n, opt::STRUCTURED_REPLY, b"");
        assert_eq!(r[0].0, rep::ERR_EXT_HEADER_REQD);
        let (_, r) = run(options(step), opt::EXTENDED_HEADERS, b"");
        assert_eq!(r[0].0, rep::ERR_INVALID);
    }

    #[test]
    fn malformed_payloads_get_err_invalid_and_negotiation_continues() {
        let (step, r) = run(start(), opt::GO, &[0, 0, 0, 200, b'x']);
        assert_eq!(r[0].0, rep::ERR_INVALID);
        options(step);
    }

    #[test]
    fn export_name_sends_size_flags_and_no_zeroes_when_agreed() {
        let mut out = Vec::new();
        let step = Negotiation::start(proto::FLAG_C_FIXED_NEWSTYLE)
            .unwrap()
            .handle(opt::EXPORT_NAME, b"disk", &Dir, &mut out);
        assert!(matches!(step, Step::Transmit(_)));
        assert_eq!(out.len(), 8 + 2 + 124);
        let mut out = Vec::new();
        start().handle(opt::EXPORT_NAME, b"", &Dir, &mut out);
        assert_eq!(out.len(), 10);
        assert_eq!(u64::from_be_bytes(out[..8].try_into().unwrap()), 1 << 20);
    }
}
