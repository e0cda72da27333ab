//! Guest loaders: what puts a guest image into a VM's memory and says
//! how its vCPU starts.

pub mod multiboot;
