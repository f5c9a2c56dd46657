"""The server's certificate authority.

- :mod:`~tessera.server.ca.manager`: :class:`CaManager` (X.509 CAs and JWT keys in prepared/active/old
  slots, signing, bundle), :class:`CaConfig`.
- :mod:`~tessera.server.ca.schedule`: the pure rotation schedule.
- :mod:`~tessera.server.ca.keymanager`: the :class:`KeyManager` protocol and the 0600-files implementation.
- :mod:`~tessera.server.ca.journal`: the persisted slot journal and its stores.
- :mod:`~tessera.server.ca.upstream`: an organisation's CA given as files.
- :mod:`~tessera.server.ca.csr`: CSR parsing and key strength checks.
"""
