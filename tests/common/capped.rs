//! An allocator that refuses (returns null for) any single allocation over 256 MiB, so that a
//! length or memory bomb that got past the guards aborts the test binary instead of passing
//! quietly on a machine with enough memory. A test file opts in with
//! `#[path = "common/capped.rs"] mod capped;` (it installs itself as the global allocator).

/// The largest single allocation allowed.
pub const CAP: usize = 256 << 20;

pub struct Capped;

// SAFETY: forwards to the system allocator unchanged, refusing (null) only requests over the cap.
unsafe impl std::alloc::GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if layout.size() > CAP {
            return std::ptr::null_mut();
        }
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        if new > CAP {
            return std::ptr::null_mut();
        }
        unsafe { std::alloc::System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static ALLOCATOR: Capped = Capped;
