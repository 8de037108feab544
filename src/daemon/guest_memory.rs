//! The guest's memory as the frontend hands it over: regions mapped from
//! the file descriptors of SET_MEM_TABLE / ADD_MEM_REG, and the table that
//! turns the frontend's own virtual addresses (in which SET_VRING_ADDR
//! names the rings) into guest physical addresses.
//!
//! Workers read the map through a [`GuestMemoryAtomic`]: a new table is
//! swapped in whole, and a request keeps the map it was parsed with alive
//! (its `GuestMemoryLoadGuard`) until it completes.

use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::sync::Arc;

use super::truncation_guard::{self, Registration};
use thiserror::Error;
use vhost::vhost_user::message::{VhostUserMemoryRegion, VhostUserSingleMemoryRegion};
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress,
};

pub type Memory = GuestMemoryMmap<()>;
pub type MemoryGuard = GuestMemoryLoadGuard<Memory>;

#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("memory region at guest address {gpa:#x}: {size:#x} bytes at offset {offset:#x} do not fit in its file of {file_len:#x} bytes")]
    RegionPastFileEnd {
        gpa: u64,
        size: u64,
        offset: u64,
        file_len: u64,
    },
    #[error("memory region at guest address {gpa:#x} ({size:#x} bytes): {why}")]
    BadRegion { gpa: u64, size: u64, why: String },
    #[error("memory regions overlap: {0}")]
    Overlap(String),
    #[error("no memory region holds frontend address {0:#x}")]
    Unmapped(u64),
    #[error("no memory region at guest address {0:#x} to remove")]
    NoSuchRegion(u64),
}

/// Where a region sits in the frontend's address space and the guest's.
#[derive(Debug, Clone, Copy)]
struct Mapping {
    frontend_addr: u64,
    size: u64,
    gpa: u64,
}

/// A region guarded against truncation; holding the region keeps its
/// mapping (and so the registered address range) alive until the guard
/// is dropped with the connection.
struct Guarded {
    registration: Option<Registration>,
    _region: Arc<GuestRegionMmap>,
}

/// The guest memory of one connection.
pub struct GuestMemoryMap {
    mem: GuestMemoryAtomic<Memory>,
    mappings: Vec<Mapping>,
    /// Every region this connection mapped, replaced ones included: an
    /// old map may still be in use by requests in flight.
    guarded: Vec<Guarded>,
}

impl Default for GuestMemoryMap {
    fn default() -> Self {
        GuestMemoryMap {
            mem: GuestMemoryAtomic::new(Memory::new()),
            mappings: Vec::new(),
            guarded: Vec::new(),
        }
    }
}

impl Drop for GuestMemoryMap {
    fn drop(&mut self) {
        // Unregister before the mappings can go away.
        self.guarded.clear();
    }
}

/// Refuses a region whose mapping would reach past the end of its file:
/// touching such a page raises SIGBUS, which would kill the daemon.
fn check_fits(region: &VhostUserMemoryRegion, file: &File) -> Result<(), MemoryError> {
    let bad = |why: String| MemoryError::BadRegion {
        gpa: region.guest_phys_addr,
        size: region.memory_size,
        why,
    };
    if region.memory_size == 0
        || region
            .guest_phys_addr
            .checked_add(region.memory_size)
            .is_none()
        || region.user_addr.checked_add(region.memory_size).is_none()
    {
        return Err(bad("empty or wrapping".into()));
    }
    let meta = file.metadata().map_err(|e| bad(format!("fstat: {e}")))?;
    // Device memory (a DAX or hugetlbfs char device) has no size to check.
    if meta.file_type().is_char_device() {
        return Ok(());
    }
    let end = region
        .mmap_offset
        .checked_add(region.memory_size)
        .ok_or_else(|| bad("offset wraps".into()))?;
    if end > meta.len() {
        return Err(MemoryError::RegionPastFileEnd {
            gpa: region.guest_phys_addr,
            size: region.memory_size,
            offset: region.mmap_offset,
            file_len: meta.len(),
        });
    }
    Ok(())
}

fn map_region(
    region: &VhostUserMemoryRegion,
    file: File,
) -> Result<Arc<GuestRegionMmap>, MemoryError> {
    check_fits(region, &file)?;
    let bad = |why: String| MemoryError::BadRegion {
        gpa: region.guest_phys_addr,
        size: region.memory_size,
        why,
    };
    let mmap = region
        .mmap_region::<()>(file)
        .map_err(|e| bad(format!("mmap: {e}")))?;
    GuestRegionMmap::new(mmap, GuestAddress(region.guest_phys_addr))
        .map(Arc::new)
        .ok_or_else(|| bad("does not fit the guest address space".into()))
}

impl GuestMemoryMap {
    /// The map workers read from; it follows every later change.
    pub fn atomic(&self) -> GuestMemoryAtomic<Memory> {
        self.mem.clone()
    }

    /// Whether a frontend truncated the file under one of this
    /// connection's regions (src/daemon/truncation_guard.rs).
    pub fn truncated(&self) -> bool {
        self.guarded
            .iter()
            .any(|g| g.registration.as_ref().is_some_and(|r| r.truncated()))
    }

    /// Regions mapped now.
    pub fn regions(&self) -> usize {
        self.mappings.len()
    }

    /// SET_MEM_TABLE: replaces every region.
    pub fn set_table(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
    ) -> Result<(), MemoryError> {
        let mut mapped = Vec::with_capacity(regions.len());
        let mut mappings = Vec::with_capacity(regions.len());
        for (r, f) in regions.iter().zip(files) {
            let region = map_region(r, f)?;
            self.guard(&region);
            mapped.push(region);
            mappings.push(Mapping {
                frontend_addr: r.user_addr,
                size: r.memory_size,
                gpa: r.guest_phys_addr,
            });
        }
        let mem =
            Memory::from_arc_regions(mapped).map_err(|e| MemoryError::Overlap(e.to_string()))?;
        self.mem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(mem);
        self.mappings = mappings;
        Ok(())
    }

    /// ADD_MEM_REG: one more region.
    pub fn add_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        file: File,
    ) -> Result<(), MemoryError> {
        let mapped = map_region(region, file)?;
        self.guard(&mapped);
        let mem = self
            .mem
            .memory()
            .insert_region(mapped)
            .map_err(|e| MemoryError::Overlap(e.to_string()))?;
        self.mem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(mem);
        self.mappings.push(Mapping {
            frontend_addr: region.user_addr,
            size: region.memory_size,
            gpa: region.guest_phys_addr,
        });
        Ok(())
    }

    /// REM_MEM_REG.
    pub fn remove_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
    ) -> Result<(), MemoryError> {
        let (mem, _) = self
            .mem
            .memory()
            .remove_region(GuestAddress(region.guest_phys_addr), region.memory_size)
            .map_err(|_| MemoryError::NoSuchRegion(region.guest_phys_addr))?;
        self.mem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(mem);
        self.mappings.retain(|m| m.gpa != region.guest_phys_addr);
        Ok(())
    }

    fn guard(&mut self, region: &Arc<GuestRegionMmap>) {
        let start = region
            .get_host_address(MemoryRegionAddress(0))
            .unwrap_or(std::ptr::null_mut());
        self.guarded.push(Guarded {
            registration: truncation_guard::register(start, crate::units::to_usize(region.len())),
            _region: region.clone(),
        });
    }

    /// The guest physical address of a frontend virtual address.
    pub fn frontend_to_guest(&self, addr: u64) -> Result<u64, MemoryError> {
        self.mappings
            .iter()
            .find(|m| addr >= m.frontend_addr && addr - m.frontend_addr < m.size)
            .map(|m| addr - m.frontend_addr + m.gpa)
            .ok_or(MemoryError::Unmapped(addr))
    }
}
