//! The controller's side of the ledger's regions (`gpuslice_common::ledger::regions`): it makes
//! each group's memory and settings page, maps them into its own view as slots are given out
//! and taken back, publishes each group's settings from its own memory (the authority), hands a
//! registered process its three descriptors, and after a restart takes the memory back from
//! the processes still holding it.

use super::State;
use gpuslice_common::ledger::{self, GroupSlot, Origin, Owner, SettingsPage};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering::*;

/// One group's memory: its counters and members' slots (read-write for members), and the page
/// where the controller publishes its settings (read-only for members).
pub struct GroupMemory {
    counters: OwnedFd,
    settings: SettingsPage,
    settings_fd: OwnedFd,
}

fn io_error(what: &str) -> impl FnOnce(std::io::Error) -> String + '_ {
    move |e| format!("cannot {what}: {e}")
}

impl State {
    /// Sets up the device memory and, after a restart, takes back each group's memory from the
    /// live processes holding it (by the inodes recorded in the ledger file). Before `adopt`,
    /// which then reads the slots through the memory found.
    pub fn init_memory(&mut self, adopted: bool) -> Result<(), String> {
        let mut found = if adopted { self.ledger.reclaim() } else { Default::default() };
        let g = self.ledger.geometry();
        let devices = match found.devices.take() {
            Some(fd) => fd,
            None => {
                let fd = self.ledger.new_device_memory().map_err(io_error("make the device memory"))?;
                self.ledger.map_device_memory(fd.as_fd()).map_err(io_error("map the device memory"))?;
                self.ledger.header().devices_inode.store(ledger::inode(fd.as_fd()).unwrap_or(0), Relaxed);
                fd
            }
        };
        self.devices_memory = Some(devices);
        for i in 0..g.max_groups as usize {
            let Some(counters) = found.counters.remove(&i) else {
                self.forget_group_memory(i);
                continue;
            };
            let page = found.settings.remove(&i).and_then(|fd| SettingsPage::map(fd.as_fd(), true).ok().map(|p| (p, fd)));
            let (settings, settings_fd) = match page {
                Some(p) => p,
                None => {
                    tracing::warn!(
                        "group slot {i}: its settings page was not found; members that started before the restart keep reading the last settings published"
                    );
                    let (page, fd) = SettingsPage::create(i).map_err(io_error("make a settings page"))?;
                    self.rebuild_settings(i, page.slot());
                    (page, fd)
                }
            };
            self.ledger.group_index(i).settings_inode.store(ledger::inode(settings_fd.as_fd()).unwrap_or(0), Relaxed);
            self.memory.insert(i, GroupMemory { counters, settings, settings_fd });
        }
        for slot in 0..g.max_procs as usize {
            let owner = self.ledger.process_index(slot).group_plus_one.load(Relaxed);
            if owner != 0 && !self.memory.contains_key(&(owner as usize - 1)) {
                self.ledger.process_index(slot).group_plus_one.store(0, Relaxed);
            }
        }
        Ok(())
    }

    /// After a restart that found group `i`'s memory but not its settings page (its members
    /// closed it): what to publish again on `page`. Nothing its members can write decides it:
    /// their writable copy (`self.ledger.group(i)`) may hold any limits, share, priority, pin,
    /// owner or name (another group's, whose slot `adopt` then frees as not distinct).
    ///
    /// Every group's settings come from the ledger file's copy (`save_settings`: written by the
    /// controller only, root's, under the group's memory in every view), all of them: limits,
    /// shares, caps, priority, name, what pins it, its origin, owner and config hash, so an
    /// environment group stays its uid's. Without that copy (a ledger from a controller that
    /// kept only pinned groups' copies, or one it could not read) the group fails closed
    /// (`fail_closed`).
    fn rebuild_settings(&self, i: usize, page: &GroupSlot) {
        let why = match self.ledger.saved_group_page(i) {
            Ok(saved) if saved.state.load(Acquire) == ledger::LIVE => {
                copy_settings(&saved, page);
                page.owner.store(saved.owner.load(Relaxed), Relaxed);
                page.config_hash.store(saved.config_hash.load(Relaxed), Relaxed);
                page.state.store(ledger::LIVE, Release);
                tracing::info!("group {:?} (slot {i}): its settings are the copy the ledger file kept", saved.name());
                return;
            }
            Ok(_) => "the ledger file holds no copy of them (as a controller that kept only pinned groups' copies left it)".to_string(),
            Err(e) => format!("its copy in the ledger file cannot be read ({e})"),
        };
        fail_closed(i, page, &why, &self.ledger.group(i).name());
        // The writable copy follows, so that the first tick does not report these values as a
        // tenant's rewrite (`enforce`).
        copy_settings(page, self.ledger.group(i));
    }

    /// New memory for group slot `i`, mapped over its page (before anything is written there).
    pub(super) fn make_group_memory(&mut self, i: usize) -> Result<(), String> {
        let counters = self.ledger.new_group_memory(i).map_err(io_error("make a group's memory"))?;
        let (settings, settings_fd) = SettingsPage::create(i).map_err(io_error("make a group's settings page"))?;
        self.ledger.map_group_page(i, Some(counters.as_fd())).map_err(io_error("map a group's memory"))?;
        let index = self.ledger.group_index(i);
        index.counters_inode.store(ledger::inode(counters.as_fd()).unwrap_or(0), Relaxed);
        index.settings_inode.store(ledger::inode(settings_fd.as_fd()).unwrap_or(0), Relaxed);
        self.memory.insert(i, GroupMemory { counters, settings, settings_fd });
        Ok(())
    }

    /// Group slot `i` no longer has memory: its page is the ledger file's own again.
    pub(super) fn forget_group_memory(&mut self, i: usize) {
        if self.memory.remove(&i).is_some() {
            if let Err(e) = self.ledger.map_group_page(i, None) {
                tracing::error!("group slot {i}: cannot map the ledger's own page back: {e}");
            }
        }
        let index = self.ledger.group_index(i);
        index.counters_inode.store(0, Relaxed);
        index.settings_inode.store(0, Relaxed);
    }

    /// Maps process slot `slot` from group `group`'s memory (before the slot is written).
    pub(super) fn map_member(&self, slot: usize, group: usize) -> Result<(), String> {
        let memory = self.memory.get(&group).ok_or_else(|| format!("group slot {group} has no memory"))?;
        self.ledger.map_process_page(slot, Some(memory.counters.as_fd())).map_err(io_error("map a process slot"))?;
        self.ledger.process_index(slot).group_plus_one.store(group as u64 + 1, Relaxed);
        Ok(())
    }

    /// Process slot `slot` is nobody's: the ledger file's own page again, without the
    /// controller's record of its last process (`record`).
    pub(super) fn unmap_member(&self, slot: usize) {
        if self.ledger.process_index(slot).group_plus_one.swap(0, Relaxed) != 0 {
            if let Err(e) = self.ledger.map_process_page(slot, None) {
                tracing::error!("process slot {slot}: cannot map the ledger's own page back: {e}");
            }
        }
        if let Err(e) = self.ledger.clear_process_record(slot) {
            tracing::error!("process slot {slot}: cannot clear the controller's record in the ledger file: {e}");
        }
    }

    /// Writes every group's settings, as the controller holds them, into the page its members
    /// read them from, and keeps the controller's record of the device table in the ledger file
    /// (`save_device_record`: what a restart takes the table from, and starts new device memory
    /// from when no process holds the old). Called after every request and every tick.
    pub fn publish(&self) {
        for &i in self.groups.keys() {
            self.publish_group(i);
            self.save_settings(i);
        }
        self.save_device_record();
    }

    pub(crate) fn publish_group(&self, i: usize) {
        let (Some(info), Some(memory)) = (self.groups.get(&i), self.memory.get(&i)) else { return };
        let page: &GroupSlot = memory.settings.slot();
        for d in 0..ledger::MAX_DEVICES {
            page.devices[d].limit.store(info.limits[d], Relaxed);
            if page.devices[d].share.load(Relaxed) != info.shares[d] {
                page.set_share(d, info.shares[d]);
            }
            page.devices[d].cap.store(info.sm_caps[d], Relaxed);
        }
        page.priority.store(info.priority, Relaxed);
        page.pinned.store(info.pinned as u32, Relaxed);
        page.origin.store(info.origin as u32, Relaxed);
        page.owner.store(super::owner_of(info.env_uid).word(), Relaxed);
        page.config_hash.store(info.config_hash, Relaxed);
        if page.name() != info.name {
            page.set_name(&info.name);
        }
        page.state.store(ledger::LIVE, Release);
        self.publish_members(i, memory.settings.members());
        if let Some(marks) = (self.marks_of)(&info.name) {
            memory.settings.members().marks.store(marks, Relaxed);
        }
    }

    /// Keeps group `i`'s published settings in the ledger file too (`save_group_page`), where
    /// no member writes: its memory lives only in the controller and in its members, so a
    /// controller killed before anyone registered in a pinned group (or after its last member
    /// exited) took the only copy with it, and the restarted one dropped the group; members
    /// that came later made a new one, without its limits (`faults.rs`'s restart test under
    /// load: `set --create --group ha --memory 4GiB`, then members registered with "no memory
    /// limit"). And a restart that finds a group's memory but not its settings page (its
    /// members closed it) takes its settings from here, not from the members' writable copy
    /// (`rebuild_settings`): every group's, pinned or not. The copy says what pinned the group
    /// (`GroupSlot::origin`), so that a restart unpins a config group the new config no longer
    /// names. One 4 KiB `pwrite` per group per publish (every tick and every request that
    /// changes something): about 1.2 µs each on tmpfs, 0.3 ms for a full table of 256 groups.
    fn save_settings(&self, i: usize) {
        let (Some(info), Some(page)) = (self.groups.get(&i), self.published(i)) else { return };
        if let Err(e) = self.ledger.save_group_page(i, page) {
            tracing::error!("group {:?}: cannot keep a copy of its settings in the ledger file: {e}", info.name);
        }
    }

    /// After a restart: pinned group `i` was found only as the copy `save_settings` keeps (no live
    /// process held its memory), and its settings were read from it into `self.groups`. New
    /// memory for it, holding those settings, so that members can register in it again.
    pub(super) fn renew_group_memory(&mut self, i: usize) -> Result<(), String> {
        let Some(name) = self.groups.get(&i).map(|g| g.name.clone()) else { return Ok(()) };
        self.make_group_memory(i)?;
        let g = self.ledger.group(i);
        g.reset();
        g.set_name(&name);
        g.state.store(ledger::LIVE, Release);
        self.publish_group(i);
        if let Some(memory) = self.memory.get(&i) {
            copy_settings(memory.settings.slot(), self.ledger.group(i));
        }
        self.save_settings(i);
        Ok(())
    }

    /// Group slot `i`'s suspend request word (`MemberSettings::suspend`; 0 without a page).
    pub(crate) fn suspend_request(&self, i: usize) -> u32 {
        self.memory.get(&i).map_or(0, |m| m.settings.members().suspend.load(Acquire))
    }

    /// Whether group slot `i` has its settings pages (a group without members has none).
    pub(crate) fn has_settings(&self, i: usize) -> bool {
        self.memory.contains_key(&i)
    }

    /// Writes group slot `i`'s suspend request word and wakes its members' agents. False
    /// without a page (a group without members has no agents to ask).
    pub(crate) fn set_suspend_request(&self, i: usize, word: u32) -> bool {
        let Some(m) = self.memory.get(&i) else { return false };
        let page = m.settings.members();
        page.suspend.store(word, Release);
        gpuslice_common::turns::futex_wake(&page.suspend, u32::MAX);
        true
    }

    /// Group slot `i`'s suspension marks as last published (`ledger::MARK_*`; 0 without a page).
    pub(crate) fn published_marks(&self, i: usize) -> u32 {
        self.memory.get(&i).map_or(0, |m| m.settings.members().marks.load(Relaxed))
    }

    /// Group `i`'s members page: each member's own priority and the group's penalty (the
    /// cross-check's, summed), from the controller's records; every other slot inherits.
    fn publish_members(&self, i: usize, page: &ledger::MemberSettings) {
        let mut penalty = [0u64; ledger::MAX_DEVICES];
        let slots = (self.ledger.geometry().max_procs as usize).min(ledger::MEMBER_PRIORITIES);
        let mut own = vec![ledger::PRIORITY_INHERIT; slots];
        for (&slot, w) in self.watched.iter().filter(|(&slot, w)| w.group == i && slot < slots) {
            own[slot] = w.priority;
            for (sum, p) in penalty.iter_mut().zip(w.penalty) {
                *sum = sum.saturating_add(p);
            }
        }
        for (slot, own) in own.into_iter().enumerate() {
            if u32::from(page.priority[slot].load(Relaxed)) != own {
                page.set_priority(slot, own);
            }
        }
        for (d, p) in penalty.into_iter().enumerate() {
            page.penalty[d].store(p, Relaxed);
        }
    }

    /// After a restart: process slot `slot`'s own priority as the previous controller published
    /// it on group `group`'s members page (`PRIORITY_INHERIT` without one).
    pub(super) fn published_priority(&self, group: usize, slot: usize) -> u32 {
        let page = self.memory.get(&group).map(|m| m.settings.members());
        page.and_then(|p| p.priority.get(slot)).map_or(ledger::PRIORITY_INHERIT, |p| u32::from(p.load(Relaxed)))
    }

    /// Group slot `i`'s published settings, if it has a page.
    pub(super) fn published(&self, i: usize) -> Option<&GroupSlot> {
        self.memory.get(&i).map(|m| m.settings.slot())
    }

    /// After a restart: takes group `i`'s limits, shares and priority from the page the
    /// previous controller published (its members could not write it). False without one.
    pub(super) fn remember_published(&mut self, i: usize) -> bool {
        let (Some(memory), Some(info)) = (self.memory.get(&i), self.groups.get_mut(&i)) else { return false };
        let page = memory.settings.slot();
        for d in 0..ledger::MAX_DEVICES {
            info.limits[d] = page.devices[d].limit.load(Relaxed);
            info.shares[d] = page.devices[d].share.load(Relaxed);
            info.sm_caps[d] = page.devices[d].cap.load(Relaxed);
        }
        info.priority = page.priority.load(Relaxed);
        true
    }

    /// Applies an edit to group `i`'s settings on its published page, where no member can write
    /// (a member racing the edit in its writable copy cannot have its value taken as the
    /// controller's), takes them as the controller's, and mirrors them into the members' copy.
    pub(super) fn edit_settings(&mut self, i: usize, apply: impl FnOnce(&GroupSlot)) {
        // The page holds the controller's settings before the edit (a group just made included).
        self.publish_group(i);
        match self.memory.get(&i) {
            Some(memory) => {
                let page = memory.settings.slot();
                apply(page);
                copy_settings(page, self.ledger.group(i));
            }
            None => apply(self.ledger.group(i)),
        }
        if !self.remember_published(i) {
            self.remember_group(i);
        }
        if let Some(info) = self.groups.get(&i) {
            self.ledger.group(i).pinned.store(info.pinned as u32, Relaxed);
            self.ledger.group(i).origin.store(info.origin as u32, Relaxed);
        }
    }

    /// What a process registered in group `group` is handed: its group's memory and the device
    /// memory (read-write), and its group's settings page (read-only).
    pub fn descriptors_for(&self, group: usize) -> Result<Vec<OwnedFd>, String> {
        let memory = self.memory.get(&group).ok_or_else(|| format!("group slot {group} has no memory"))?;
        let devices = self.devices_memory.as_ref().ok_or("no device memory")?;
        Ok(vec![
            memory.counters.try_clone().map_err(io_error("duplicate a descriptor"))?,
            devices.try_clone().map_err(io_error("duplicate a descriptor"))?,
            ledger::read_only(memory.settings_fd.as_fd()).map_err(io_error("open a settings page read-only"))?,
        ])
    }
}

/// Group slot `i`'s settings when no trusted copy of them is left (`rebuild_settings`), `why`:
/// the most restrictive ones rather than its members' word (`was`, the name in their writable
/// copy, is only logged). No memory beyond what it holds (limit 0 on every device: its members'
/// bytes stay counted, nothing more is granted), a 1 % share that is also its cap, low
/// priority, a name no process or config can ask for (`lost_group_name`), unpinned, owner
/// unrecorded (`adopt` lets no process join it). It goes with its last member. Freeing it
/// instead would drop its members' bytes from the books while they still hold them, and the
/// config's values are keyed by a name its members could have written.
fn fail_closed(i: usize, page: &GroupSlot, why: &str, was: &str) {
    let name = gpuslice_common::settings::lost_group_name(i);
    for d in 0..ledger::MAX_DEVICES {
        page.devices[d].limit.store(0, Relaxed);
        page.set_share(d, 1);
        page.set_cap(d, 0);
    }
    page.priority.store(ledger::Priority::Low as u32, Relaxed);
    page.pinned.store(0, Relaxed);
    page.origin.store(Origin::Unrecorded as u32, Relaxed);
    page.owner.store(Owner::Unrecorded.word(), Relaxed);
    page.config_hash.store(0, Relaxed);
    page.set_name(&name);
    page.state.store(ledger::LIVE, Release);
    let was: String = was.chars().take(ledger::NAME_BYTES).map(|c| if c.is_control() { '?' } else { c }).collect();
    tracing::warn!(
        "group slot {i}: its settings page was not found and {why}; its members' own copy (which names it {was:?}) is not taken: it is now group {name:?}, held to the memory it has (limit 0), a 1% SM share, low priority, closed to new processes; it goes when its last member exits"
    );
}

/// Settings, name and what pins the group; not `owner`, which lives on the published page only
/// (the members' writable copy is never read for it).
fn copy_settings(from: &GroupSlot, to: &GroupSlot) {
    for d in 0..ledger::MAX_DEVICES {
        to.devices[d].limit.store(from.devices[d].limit.load(Relaxed), Relaxed);
        to.set_share(d, from.devices[d].share.load(Relaxed));
        to.set_cap(d, from.devices[d].cap.load(Relaxed));
    }
    to.priority.store(from.priority.load(Relaxed), Relaxed);
    to.pinned.store(from.pinned.load(Relaxed), Relaxed);
    to.origin.store(from.origin.load(Relaxed), Relaxed);
    to.set_name(&from.name());
}
