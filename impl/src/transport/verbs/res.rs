//! Owned verbs resources (device context, protection domain, completion queues with their
//! completion channels, queue pairs, memory regions, DMA buffers) over the `ibverbs` crate's
//! `ffi` bindings. Every `unsafe` block of the transport lives here.
//!
//! Lifetimes are enforced by reference counting instead of borrows: each resource holds an
//! `Arc` of what it was created from (queue pair -> completion queues -> device), so a queue
//! pair is always destroyed before its completion queues, and the protection domain and the
//! device context only after every queue pair, completion queue and memory region.

use std::ffi::CStr;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use ibverbs_sys as ffi;

use crate::memory::ram::RamBlock;

/// One GID table entry of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GidInfo {
    pub port: u8,
    pub index: u8,
    pub gid: [u8; 16],
    /// 0 = IB, 1 = RoCE v1, 2 = RoCE v2.
    pub gid_type: u32,
}

/// One port of a device.
#[derive(Debug, Clone)]
pub struct PortInfo {
    pub num: u8,
    pub active: bool,
    pub state: String,
    pub ethernet: bool,
    pub lid: u16,
    pub active_mtu: u32,
    pub gids: Vec<GidInfo>,
}

/// One device with its ports.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub name: String,
    pub ports: Vec<PortInfo>,
}

fn no_device(e: io::Error) -> io::Error {
    let why = match e.raw_os_error() {
        Some(libc::ENOSYS) => "the kernel has no RDMA support".to_string(),
        _ => e.to_string(),
    };
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("no RDMA device found ({why})"),
    )
}

/// The device list, freed on drop.
struct DevList {
    list: *mut *mut ffi::ibv_device,
    n: usize,
}

impl DevList {
    fn get() -> io::Result<Self> {
        let mut n: i32 = 0;
        // SAFETY: `n` is a valid out-pointer; a NULL return sets errno (ENOSYS without kernel
        // support).
        let list = unsafe { ffi::ibv_get_device_list(&mut n) };
        if list.is_null() {
            return Err(no_device(io::Error::last_os_error()));
        }
        Ok(DevList {
            list,
            n: n.max(0) as usize,
        })
    }

    fn device(&self, i: usize) -> *mut ffi::ibv_device {
        assert!(i < self.n);
        // SAFETY: the list holds `n` valid device pointers while it is not freed.
        unsafe { *self.list.add(i) }
    }

    fn name(&self, i: usize) -> String {
        // SAFETY: the device pointer is valid; the name is a NUL-terminated string owned by it.
        let p = unsafe { ffi::ibv_get_device_name(self.device(i)) };
        if p.is_null() {
            return format!("device{i}");
        }
        // SAFETY: non-NULL, NUL-terminated, valid while the list lives; copied out at once.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

impl Drop for DevList {
    fn drop(&mut self) {
        // SAFETY: `list` came from ibv_get_device_list and is freed once. Contexts opened from
        // its devices stay valid after the list is freed (libibverbs reference-counts them).
        unsafe { ffi::ibv_free_device_list(self.list) }
    }
}

/// An open device context.
struct Ctx(*mut ffi::ibv_context);

impl Ctx {
    fn open(dev: *mut ffi::ibv_device) -> io::Result<Self> {
        // SAFETY: `dev` is a valid device from a live device list.
        let ctx = unsafe { ffi::ibv_open_device(dev) };
        if ctx.is_null() {
            return Err(io::Error::last_os_error());
        }
        Ok(Ctx(ctx))
    }

    fn port_count(&self) -> io::Result<u8> {
        // SAFETY: plain-old-data structure, all zeroes is a valid value.
        let mut attr: ffi::ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: valid context and out-pointer.
        let rc = unsafe { ffi::ibv_query_device(self.0, &mut attr) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(attr.phys_port_cnt)
    }

    fn port(&self, num: u8) -> io::Result<ffi::ibv_port_attr> {
        // SAFETY: plain-old-data structure, all zeroes is a valid value.
        let mut attr: ffi::ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: the exported ibv_query_port fills the compat prefix of `ibv_port_attr`
        // (the full structure is larger), through a valid out-pointer.
        let rc = unsafe { ffi::ibv_query_port(self.0, num, &mut attr as *mut _ as *mut _) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(attr)
    }

    fn gids(&self, max: usize) -> io::Result<Vec<GidInfo>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        // SAFETY: plain-old-data structure, all zeroes is a valid value.
        let mut t: Vec<ffi::ibv_gid_entry> = vec![unsafe { std::mem::zeroed() }; max];
        // SAFETY: `t` has room for `max` entries of the size passed.
        let n = unsafe {
            ffi::_ibv_query_gid_table(
                self.0,
                t.as_mut_ptr(),
                t.len(),
                0,
                std::mem::size_of::<ffi::ibv_gid_entry>(),
            )
        };
        if n < 0 {
            return Err(io::Error::from_raw_os_error((-n) as i32));
        }
        t.truncate(n as usize);
        Ok(t.iter()
            .map(|e| GidInfo {
                port: e.port_num as u8,
                index: e.gid_index as u8,
                // SAFETY: every bit pattern of the union is a valid byte array.
                gid: unsafe { e.gid.raw },
                gid_type: e.gid_type,
            })
            .collect())
    }

    fn describe(&self, name: String) -> io::Result<DeviceInfo> {
        let mut ports = Vec::new();
        let mut all_gids = Vec::new();
        let mut total = 0usize;
        for num in 1..=self.port_count()? {
            let a = self.port(num)?;
            total += a.gid_tbl_len.max(0) as usize;
            ports.push((num, a));
        }
        if total > 0 {
            all_gids = self.gids(total)?;
        }
        Ok(DeviceInfo {
            name,
            ports: ports
                .into_iter()
                .map(|(num, a)| PortInfo {
                    num,
                    active: a.state == ffi::ibv_port_state::IBV_PORT_ACTIVE,
                    state: port_state_name(a.state).to_string(),
                    ethernet: a.link_layer as u32 == ffi::IBV_LINK_LAYER_ETHERNET,
                    lid: a.lid,
                    active_mtu: a.active_mtu,
                    gids: all_gids.iter().filter(|g| g.port == num).copied().collect(),
                })
                .collect(),
        })
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        // SAFETY: opened once, closed once, after everything created from it (see module doc).
        unsafe { ffi::ibv_close_device(self.0) };
    }
}

fn port_state_name(s: ffi::ibv_port_state::Type) -> &'static str {
    match s {
        ffi::ibv_port_state::IBV_PORT_NOP => "nop",
        ffi::ibv_port_state::IBV_PORT_DOWN => "down",
        ffi::ibv_port_state::IBV_PORT_INIT => "init",
        ffi::ibv_port_state::IBV_PORT_ARMED => "armed",
        ffi::ibv_port_state::IBV_PORT_ACTIVE => "active",
        ffi::ibv_port_state::IBV_PORT_ACTIVE_DEFER => "active-defer",
        _ => "unknown",
    }
}

/// Every RDMA device with its ports and GIDs. `Err` says "no RDMA device found" when the
/// kernel has no RDMA support; an empty list is returned as is.
pub fn list_devices() -> io::Result<Vec<DeviceInfo>> {
    let list = DevList::get()?;
    let mut out = Vec::new();
    for i in 0..list.n {
        let name = list.name(i);
        match Ctx::open(list.device(i)).and_then(|c| c.describe(name.clone())) {
            Ok(d) => out.push(d),
            Err(e) => tracing::warn!("RDMA device {name}: {e}"),
        }
    }
    Ok(out)
}

/// An open device with its protection domain and the chosen port and GID.
pub struct Device {
    pd: *mut ffi::ibv_pd,
    ctx: Ctx,
    pub name: String,
    pub port: u8,
    pub gid_index: u8,
    pub gid: [u8; 16],
    pub lid: u16,
    pub mtu: u32,
}

// SAFETY: verbs objects may be used from any thread (libibverbs is thread-safe); the raw
// pointers are only freed in Drop.
unsafe impl Send for Device {}
// SAFETY: as above.
unsafe impl Sync for Device {}

impl Device {
    /// Opens `name` (or the first device with an active port), picks the port and GID with
    /// `choose`, and allocates a protection domain.
    pub fn open(
        name: Option<&str>,
        choose: impl Fn(&DeviceInfo) -> Result<(u8, u8), String>,
    ) -> io::Result<Arc<Device>> {
        let list = DevList::get()?;
        if list.n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "no RDMA device found",
            ));
        }
        let mut why = Vec::new();
        for i in 0..list.n {
            let dname = list.name(i);
            if name.is_some_and(|n| n != dname) {
                continue;
            }
            let ctx = Ctx::open(list.device(i))?;
            let info = ctx.describe(dname.clone())?;
            let (port, gid_index) = match choose(&info) {
                Ok(c) => c,
                Err(e) => {
                    why.push(format!("{dname}: {e}"));
                    continue;
                }
            };
            let pinfo = info
                .ports
                .iter()
                .find(|p| p.num == port)
                .expect("chosen port exists");
            let gid = pinfo
                .gids
                .iter()
                .find(|g| g.index == gid_index)
                .map_or([0; 16], |g| g.gid);
            // SAFETY: valid context.
            let pd = unsafe { ffi::ibv_alloc_pd(ctx.0) };
            if pd.is_null() {
                return Err(io::Error::last_os_error());
            }
            return Ok(Arc::new(Device {
                pd,
                ctx,
                name: dname,
                port,
                gid_index,
                gid,
                lid: pinfo.lid,
                mtu: pinfo.active_mtu,
            }));
        }
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            match name {
                Some(n) if why.is_empty() => format!("no RDMA device named {n}"),
                _ if why.is_empty() => "no RDMA device found".to_string(),
                _ => format!("no usable RDMA port: {}", why.join("; ")),
            },
        ))
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: every object created in this PD holds an Arc of the device, so none is left.
        unsafe { ffi::ibv_dealloc_pd(self.pd) };
    }
}

/// A completion queue with its own completion channel (so its poller can sleep).
pub struct Cq {
    cq: *mut ffi::ibv_cq,
    channel: *mut ffi::ibv_comp_channel,
    _dev: Arc<Device>,
}

// SAFETY: see `Device`; polling is done by one thread (the CQ's poller).
unsafe impl Send for Cq {}
// SAFETY: as above.
unsafe impl Sync for Cq {}

/// A work completion, copied out of the CQ.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    pub wr_id: u64,
    pub qp_num: u32,
    pub ok: bool,
    pub status: u32,
    pub byte_len: u32,
}

impl Cq {
    pub fn new(dev: &Arc<Device>, entries: i32) -> io::Result<Arc<Cq>> {
        // SAFETY: valid context.
        let channel = unsafe { ffi::ibv_create_comp_channel(dev.ctx.0) };
        if channel.is_null() {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: valid context and channel.
        let cq =
            unsafe { ffi::ibv_create_cq(dev.ctx.0, entries, std::ptr::null_mut(), channel, 0) };
        if cq.is_null() {
            let e = io::Error::last_os_error();
            // SAFETY: created above, not used by any CQ.
            unsafe { ffi::ibv_destroy_comp_channel(channel) };
            return Err(e);
        }
        let me = Cq {
            cq,
            channel,
            _dev: dev.clone(),
        };
        me.arm()?;
        Ok(Arc::new(me))
    }

    fn arm(&self) -> io::Result<()> {
        // SAFETY: the CQ is valid; req_notify_cq is filled in by every provider.
        let rc = unsafe {
            let ctx = (*self.cq).context;
            ((*ctx)
                .ops
                .req_notify_cq
                .expect("provider implements req_notify_cq"))(self.cq, 0)
        };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(())
    }

    /// Takes up to `max` completions off the queue, never blocking.
    pub fn poll(&self, out: &mut Vec<Completion>, max: usize) -> io::Result<()> {
        // SAFETY: plain-old-data structure, all zeroes is a valid value.
        let mut wcs: Vec<ffi::ibv_wc> = vec![unsafe { std::mem::zeroed() }; max.max(1)];
        // SAFETY: the CQ is valid and `wcs` has room for the count passed.
        let n = unsafe {
            let ctx = (*self.cq).context;
            ((*ctx).ops.poll_cq.expect("provider implements poll_cq"))(
                self.cq,
                wcs.len() as i32,
                wcs.as_mut_ptr(),
            )
        };
        if n < 0 {
            return Err(io::Error::other("ibv_poll_cq failed"));
        }
        out.extend(wcs[..n as usize].iter().map(|w| Completion {
            wr_id: w.wr_id(),
            qp_num: w.qp_num,
            ok: w.is_valid(),
            status: w.error().map_or(0, |(s, _)| s),
            byte_len: w.len() as u32,
        }));
        Ok(())
    }

    /// Sleeps until the CQ signals a completion event or `timeout` passes, then re-arms it.
    /// Completions must be polled after this returns (and before the next wait).
    pub fn wait(&self, timeout: Duration) -> io::Result<()> {
        // SAFETY: the channel is valid; its fd is owned by libibverbs.
        let fd = unsafe { (*self.channel).fd };
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut p, 1, timeout.as_millis().min(i32::MAX as u128) as i32) };
        if rc <= 0 || p.revents & libc::POLLIN == 0 {
            return Ok(());
        }
        let mut cq: *mut ffi::ibv_cq = std::ptr::null_mut();
        let mut ctx: *mut std::ffi::c_void = std::ptr::null_mut();
        // SAFETY: the fd is readable, so this does not block; out-pointers are valid.
        let rc = unsafe { ffi::ibv_get_cq_event(self.channel, &mut cq, &mut ctx) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: one event was taken for this CQ (the channel serves only it); acknowledged
        // at once so destroying the CQ never waits.
        unsafe { ffi::ibv_ack_cq_events(cq, 1) };
        self.arm()
    }
}

impl Drop for Cq {
    fn drop(&mut self) {
        // SAFETY: every QP using this CQ holds an Arc of it, so none is left; every event was
        // acknowledged. The channel is destroyed after the CQ that uses it.
        unsafe {
            ffi::ibv_destroy_cq(self.cq);
            ffi::ibv_destroy_comp_channel(self.channel);
        }
    }
}

/// What a queue pair needs of its peer to connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    pub qpn: u32,
    pub psn: u32,
    pub lid: u16,
    pub mtu: u8,
    pub gid: [u8; 16],
}

/// An RC queue pair.
pub struct Qp {
    qp: *mut ffi::ibv_qp,
    psn: u32,
    dev: Arc<Device>,
    _cqs: (Arc<Cq>, Arc<Cq>),
}

// SAFETY: see `Device`; libibverbs serialises posting internally per queue.
unsafe impl Send for Qp {}
// SAFETY: as above.
unsafe impl Sync for Qp {}

/// Remote access a queue pair allows its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QpAccess {
    /// SEND/RECV only.
    None,
    /// RDMA WRITE into this side's memory regions that also allow it (never read, never atomics).
    RemoteWrite,
}

impl Qp {
    pub fn new(
        dev: &Arc<Device>,
        send_cq: &Arc<Cq>,
        recv_cq: &Arc<Cq>,
        max_send_wr: u32,
        max_recv_wr: u32,
        access: QpAccess,
        psn: u32,
    ) -> io::Result<Qp> {
        let mut init = ffi::ibv_qp_init_attr {
            qp_context: std::ptr::null_mut(),
            send_cq: send_cq.cq,
            recv_cq: recv_cq.cq,
            srq: std::ptr::null_mut(),
            cap: ffi::ibv_qp_cap {
                max_send_wr,
                max_recv_wr: max_recv_wr.max(1),
                max_send_sge: 1,
                max_recv_sge: 1,
                max_inline_data: 0,
            },
            qp_type: ffi::ibv_qp_type::IBV_QPT_RC,
            sq_sig_all: 0,
        };
        // SAFETY: valid PD, CQs and attributes.
        let qp = unsafe { ffi::ibv_create_qp(dev.pd, &mut init) };
        if qp.is_null() {
            return Err(io::Error::last_os_error());
        }
        let me = Qp {
            qp,
            psn: psn & 0xff_ffff,
            dev: dev.clone(),
            _cqs: (send_cq.clone(), recv_cq.clone()),
        };
        let mut a = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_INIT,
            pkey_index: 0,
            port_num: dev.port,
            qp_access_flags: match access {
                QpAccess::None => 0,
                QpAccess::RemoteWrite => ffi::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0,
            },
            ..Default::default()
        };
        let mask = ffi::ibv_qp_attr_mask::IBV_QP_STATE
            | ffi::ibv_qp_attr_mask::IBV_QP_PKEY_INDEX
            | ffi::ibv_qp_attr_mask::IBV_QP_PORT
            | ffi::ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS;
        me.modify(&mut a, mask)?;
        Ok(me)
    }

    fn modify(&self, a: &mut ffi::ibv_qp_attr, mask: ffi::ibv_qp_attr_mask) -> io::Result<()> {
        // SAFETY: valid QP and attributes.
        let rc = unsafe { ffi::ibv_modify_qp(self.qp, a, mask.0 as i32) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(())
    }

    pub fn num(&self) -> u32 {
        // SAFETY: valid QP; qp_num is immutable after creation.
        unsafe { (*self.qp).qp_num }
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            qpn: self.num(),
            psn: self.psn,
            lid: self.dev.lid,
            mtu: self.dev.mtu as u8,
            gid: self.dev.gid,
        }
    }

    /// INIT -> RTR -> RTS against `remote`.
    pub fn connect(&self, remote: &Endpoint) -> io::Result<()> {
        let mut a = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_RTR,
            path_mtu: (self.dev.mtu).min(remote.mtu as u32).clamp(1, 5),
            dest_qp_num: remote.qpn,
            rq_psn: remote.psn,
            max_dest_rd_atomic: 1,
            min_rnr_timer: 12,
            ah_attr: ffi::ibv_ah_attr {
                dlid: remote.lid,
                sl: 0,
                src_path_bits: 0,
                port_num: self.dev.port,
                is_global: 1,
                ..Default::default()
            },
            ..Default::default()
        };
        a.ah_attr.grh.dgid.raw = remote.gid;
        a.ah_attr.grh.hop_limit = 64;
        a.ah_attr.grh.sgid_index = self.dev.gid_index;
        let mask = ffi::ibv_qp_attr_mask::IBV_QP_STATE
            | ffi::ibv_qp_attr_mask::IBV_QP_AV
            | ffi::ibv_qp_attr_mask::IBV_QP_PATH_MTU
            | ffi::ibv_qp_attr_mask::IBV_QP_DEST_QPN
            | ffi::ibv_qp_attr_mask::IBV_QP_RQ_PSN
            | ffi::ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC
            | ffi::ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER;
        self.modify(&mut a, mask)?;
        let mut a = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_RTS,
            sq_psn: self.psn,
            // 4.096 us * 2^16 = 268 ms per try: generous under emulation (TCG, soft-RoCE).
            timeout: 16,
            retry_cnt: 7,
            // Receive buffers are always posted (credits), so RNR means a broken peer; retry
            // a bounded number of times.
            rnr_retry: 6,
            max_rd_atomic: 1,
            ..Default::default()
        };
        let mask = ffi::ibv_qp_attr_mask::IBV_QP_STATE
            | ffi::ibv_qp_attr_mask::IBV_QP_SQ_PSN
            | ffi::ibv_qp_attr_mask::IBV_QP_TIMEOUT
            | ffi::ibv_qp_attr_mask::IBV_QP_RETRY_CNT
            | ffi::ibv_qp_attr_mask::IBV_QP_RNR_RETRY
            | ffi::ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC;
        self.modify(&mut a, mask)
    }

    /// Moves the QP to the error state: outstanding work requests complete with flush errors.
    pub fn set_error(&self) {
        let mut a = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_ERR,
            ..Default::default()
        };
        let _ = self.modify(&mut a, ffi::ibv_qp_attr_mask::IBV_QP_STATE);
    }

    /// Posts a receive of `len` bytes at `addr` of `mr` (checked to lie inside it).
    ///
    /// # Safety
    /// Until the receive completes (or the queue pair is destroyed), nothing else may read or
    /// write `[addr, addr+len)`: the NIC writes it at any moment.
    pub unsafe fn post_recv(&self, mr: &Mr, addr: *mut u8, len: u32, wr_id: u64) -> io::Result<()> {
        assert!(mr.contains(addr as u64, len as u64));
        let mut sge = ffi::ibv_sge {
            addr: addr as u64,
            length: len,
            lkey: mr.lkey(),
        };
        let mut wr = ffi::ibv_recv_wr {
            wr_id,
            next: std::ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
        };
        let mut bad: *mut ffi::ibv_recv_wr = std::ptr::null_mut();
        // SAFETY: valid QP; the work request and its SGE live across the call (the provider
        // copies them); the buffer lies inside `mr` (asserted), which holds its memory, and
        // nobody else touches it until the completion (the caller's contract).
        let rc = unsafe {
            let ctx = (*self.qp).context;
            ((*ctx).ops.post_recv.expect("provider implements post_recv"))(
                self.qp, &mut wr, &mut bad,
            )
        };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(())
    }

    /// Posts a chain of sends: each `(wr_id, local addr, len, signalled, write target)`.
    /// A write target `(remote_addr, rkey)` makes it an RDMA WRITE, `None` a SEND. Every
    /// local range must lie in `mr` (checked); `mr` keeps its memory mapped.
    ///
    /// # Safety
    /// Until the completion of each work request (or of a later signalled one on this queue
    /// pair), nothing may write its local range: the NIC reads it at any moment. (Source memory
    /// written concurrently by the workload is the exception the protocol allows for: such a
    /// page is dirty and sent again, spec section 11.)
    pub unsafe fn post_send(&self, mr: &Mr, wrs: &[SendWr]) -> io::Result<()> {
        if wrs.is_empty() {
            return Ok(());
        }
        let mut sges: Vec<ffi::ibv_sge> = wrs
            .iter()
            .map(|w| {
                assert!(mr.contains(w.addr as u64, w.len as u64));
                ffi::ibv_sge {
                    addr: w.addr as u64,
                    length: w.len,
                    lkey: mr.lkey(),
                }
            })
            .collect();
        let mut list: Vec<ffi::ibv_send_wr> = Vec::with_capacity(wrs.len());
        for (w, sge) in wrs.iter().zip(sges.iter_mut()) {
            let mut wr = ffi::ibv_send_wr {
                wr_id: w.wr_id,
                next: std::ptr::null_mut(),
                sg_list: sge,
                num_sge: 1,
                opcode: if w.write.is_some() {
                    ffi::ibv_wr_opcode::IBV_WR_RDMA_WRITE
                } else {
                    ffi::ibv_wr_opcode::IBV_WR_SEND
                },
                send_flags: if w.signalled {
                    ffi::ibv_send_flags::IBV_SEND_SIGNALED.0
                } else {
                    0
                },
                __bindgen_anon_1: Default::default(),
                wr: Default::default(),
                qp_type: Default::default(),
                __bindgen_anon_2: Default::default(),
            };
            if let Some((remote_addr, rkey)) = w.write {
                wr.wr.rdma = ffi::ibv_send_wr__bindgen_ty_2__bindgen_ty_1 { remote_addr, rkey };
            }
            list.push(wr);
        }
        let base = list.as_mut_ptr();
        for i in 0..list.len() - 1 {
            // SAFETY: both indices are inside `list`, which is not reallocated any more.
            unsafe { (*base.add(i)).next = base.add(i + 1) };
        }
        let mut bad: *mut ffi::ibv_send_wr = std::ptr::null_mut();
        // SAFETY: valid QP; the chain and SGEs live across the call (the provider copies
        // them); every local range lies inside `mr` (asserted above), which holds its memory;
        // the caller keeps the ranges unwritten until the completions.
        let rc = unsafe {
            let ctx = (*self.qp).context;
            ((*ctx).ops.post_send.expect("provider implements post_send"))(self.qp, base, &mut bad)
        };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(())
    }
}

impl Drop for Qp {
    fn drop(&mut self) {
        // SAFETY: created once, destroyed once; its CQs outlive it (held by Arc).
        unsafe { ffi::ibv_destroy_qp(self.qp) };
    }
}

/// One send work request for [`Qp::post_send`].
#[derive(Debug, Clone, Copy)]
pub struct SendWr {
    pub wr_id: u64,
    pub addr: *const u8,
    pub len: u32,
    pub signalled: bool,
    pub write: Option<(u64, u32)>,
}

/// Local access a memory region grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MrAccess {
    /// The NIC may only read it (source memory, send buffers).
    LocalRead,
    /// The NIC may write it locally (receive buffers).
    LocalWrite,
    /// The peer may RDMA WRITE into it (destination memory); local write is required with it
    /// by the verbs specification. Never remote read or atomics.
    RemoteWrite,
}

/// What keeps a memory region's bytes mapped. A region holds its backing, and its `Drop`
/// deregisters before the fields drop, so the memory outlives the registration by
/// construction: no field order or caller discipline is involved.
pub enum Backing {
    /// A RAM block (source memory read by the NIC, or destination memory written by the peer).
    Block(Arc<RamBlock>),
    /// A send or receive buffer.
    Buf(Arc<DmaBuf>),
}

/// A registered memory region; deregistered on drop.
pub struct Mr {
    mr: *mut ffi::ibv_mr,
    base: u64,
    len: u64,
    _backing: Backing,
    _dev: Arc<Device>,
}

// SAFETY: see `Device`.
unsafe impl Send for Mr {}
// SAFETY: as above.
unsafe impl Sync for Mr {}

impl Mr {
    /// Registers `[offset, offset+len)` of `block`. With `zero_based`, the region's remote
    /// addresses start at 0 (remote offsets are relative to the registration, spec section
    /// 1.3), else they are the local virtual addresses. A range outside the block is an error.
    pub fn on_block(
        dev: &Arc<Device>,
        block: &Arc<RamBlock>,
        offset: u64,
        len: u64,
        access: MrAccess,
        zero_based: bool,
    ) -> io::Result<Mr> {
        if len == 0 || offset.checked_add(len).is_none_or(|e| e > block.len()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "registration outside the block",
            ));
        }
        let addr = block.as_ptr().wrapping_add(offset as usize);
        let backing = Backing::Block(block.clone());
        // SAFETY: the range lies inside the block's mapping (checked above), and the region
        // holds the block, so the mapping lives until after deregistration. RamBlock never
        // hands out references into its mapping, so the NIC reading it, or the peer writing it
        // under RemoteWrite, never races a Rust reference.
        unsafe { Self::register(dev, addr, len, access, zero_based, backing) }
    }

    /// Registers all of `buf` (virtual addresses, not zero-based).
    pub fn on_buf(dev: &Arc<Device>, buf: &Arc<DmaBuf>, access: MrAccess) -> io::Result<Mr> {
        let (addr, len) = (buf.ptr(), buf.len() as u64);
        // SAFETY: the whole allocation, held by the region until after deregistration; a
        // DmaBuf is only ever accessed through raw copies.
        unsafe { Self::register(dev, addr, len, access, false, Backing::Buf(buf.clone())) }
    }

    /// # Safety
    /// `[addr, addr+len)` must stay mapped while `backing` lives, and no Rust reference into
    /// it may exist while the region lives (the NIC reads or writes it at any time).
    unsafe fn register(
        dev: &Arc<Device>,
        addr: *mut u8,
        len: u64,
        access: MrAccess,
        zero_based: bool,
        backing: Backing,
    ) -> io::Result<Mr> {
        use ffi::ibv_access_flags as A;
        let flags = match access {
            MrAccess::LocalRead => 0,
            MrAccess::LocalWrite => A::IBV_ACCESS_LOCAL_WRITE.0,
            MrAccess::RemoteWrite => (A::IBV_ACCESS_LOCAL_WRITE | A::IBV_ACCESS_REMOTE_WRITE).0,
        };
        let iova = if zero_based { 0 } else { addr as u64 };
        // SAFETY: valid PD; the kernel pins the range and fails cleanly on a bad one; the
        // caller keeps it mapped while `backing`, which the region holds, lives.
        let mr = unsafe { ffi::ibv_reg_mr_iova2(dev.pd, addr.cast(), len as usize, iova, flags) };
        if mr.is_null() {
            return Err(io::Error::last_os_error());
        }
        Ok(Mr {
            mr,
            base: addr as u64,
            len,
            _backing: backing,
            _dev: dev.clone(),
        })
    }

    pub fn lkey(&self) -> u32 {
        // SAFETY: valid MR; keys are immutable.
        unsafe { (*self.mr).lkey }
    }

    pub fn rkey(&self) -> u32 {
        // SAFETY: valid MR; keys are immutable.
        unsafe { (*self.mr).rkey }
    }

    fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.base
            && addr
                .checked_add(len)
                .is_some_and(|e| e <= self.base + self.len)
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: registered once, deregistered once. Once this returns the NIC no longer
        // accepts the keys (no remote write lands under the rkey after it).
        unsafe { ffi::ibv_dereg_mr(self.mr) };
    }
}

/// Page-aligned heap memory for send and receive buffers, accessed only by raw copies (the
/// NIC reads or writes it concurrently, so no Rust reference into it is ever made). Which
/// slot is whose is the caller's to track, so the copies are `unsafe fn`s with that contract.
pub struct DmaBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: an owned allocation, only ever accessed through raw copies whose callers promise
// exclusive use of the range (see `write` and `read`).
unsafe impl Send for DmaBuf {}
// SAFETY: as above: shared access hands out no references, and every copy is `unsafe`.
unsafe impl Sync for DmaBuf {}

impl DmaBuf {
    const ALIGN: usize = 4096;

    pub fn new(len: usize) -> DmaBuf {
        let layout = std::alloc::Layout::from_size_align(len.max(1), Self::ALIGN)
            .expect("buffer size fits a layout");
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        DmaBuf { ptr, len }
    }

    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    fn len(&self) -> usize {
        self.len
    }

    /// Copies `data` to `offset` (bounds checked).
    ///
    /// # Safety
    /// The caller has exclusive use of `[offset, offset+data.len())`: no work request uses it
    /// and no other thread reads or writes it during the copy.
    pub unsafe fn write(&self, offset: usize, data: &[u8]) {
        assert!(offset
            .checked_add(data.len())
            .is_some_and(|e| e <= self.len));
        // SAFETY: in bounds (asserted); exclusive use of the range (the caller's contract).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(offset), data.len()) }
    }

    /// Copies `len` bytes at `offset` out (bounds checked).
    ///
    /// # Safety
    /// The caller has exclusive use of the range: the NIC finished writing it (its receive
    /// completed and it is not posted again yet) and no other thread writes it.
    pub unsafe fn read(&self, offset: usize, len: usize) -> Vec<u8> {
        assert!(offset.checked_add(len).is_some_and(|e| e <= self.len));
        let mut v = vec![0u8; len];
        // SAFETY: in bounds (asserted); nobody writes the range (the caller's contract).
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(offset), v.as_mut_ptr(), len) };
        v
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len.max(1), Self::ALIGN)
            .expect("same layout as at allocation");
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) }
    }
}
