//! KV caches: contiguous and paged storage of past keys and values (f32, f16, Q8_0), and
//! decode attention over them.
