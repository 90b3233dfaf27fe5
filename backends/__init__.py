"""Array adapters behind :class:`ckptfmt._backend.ArrayBackend`, installed as ``ckptfmt.backends``."""
