"""The server's certificate authority.

- :mod:`~tessera.server.ca.signing`: :class:`ServerCa`, the CA that signs every SVID (the server's own too).
- :mod:`~tessera.server.ca.manager`: :class:`CaManager`, the manager that rotates X.509 CAs and JWT keys through
  prepared/active/old slots, journals them and builds the bundle; it hands the active pair to its ``ca``.
- :mod:`~tessera.server.ca.slots`: the authorities and their slots (one name, the authority ID), pure.
- :mod:`~tessera.server.ca.schedule`: the pure rotation schedule.
- :mod:`~tessera.server.ca.config`: :class:`CaConfig` and the CA's conventions about time.
- :mod:`~tessera.server.ca.keymanager`: the :class:`KeyManager` protocol and the 0600-files implementation.
- :mod:`~tessera.server.ca.journal`: the persisted slot journal and its stores.
- :mod:`~tessera.server.ca.upstream`: an organisation's CA given as files.
- :mod:`~tessera.server.ca.csr`: CSR parsing and key strength checks.
- :mod:`~tessera.server.ca.crl` / :mod:`~tessera.server.ca.revocation`: CRLs and revoking SVIDs or authorities.
"""
