"""The wasmtime layer under the devices and the VMM: raw bindings (``wt``) and the host-call plumbing
(``hostop``). It imports nothing else from microvmd, so devices and the VMM can both stand on it."""
