"""Make the TLS test certificates: python3 tls_certs.py DIR

DIR/server      ca-cert.pem server-cert.pem server-key.pem   (QEMU's server layout)
DIR/<client>    ca-cert.pem client-cert.pem client-key.pem   (libnbd's client layout)
for clients admin, scoped (CN=backup-host-1), stranger, otherca (signed by a second CA),
expired (CN=admin, expired yesterday) and nocert (the CA only).
Subjects are O=tidemark-test,CN=NAME; their RFC 4514 form is printed per client.
"""
import datetime
import os
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
import ipaddress

NOW = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
DAY = datetime.timedelta(days=1)


def name(cn):
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tidemark-test"),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])


def key():
    return ec.generate_private_key(ec.SECP256R1())


def cert(subject, k, issuer, issuer_key, ca=False, usage=None, san=None, start=None, end=None):
    b = (x509.CertificateBuilder()
         .subject_name(subject).issuer_name(issuer).public_key(k.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(start or NOW - DAY).not_valid_after(end or NOW + 30 * DAY)
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
    else:
        b = b.add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True)
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(k.public_key()), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def pem_cert(c):
    return c.public_bytes(serialization.Encoding.PEM)


def pem_key(k):
    return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                           serialization.NoEncryption())


def main(out):
    ca_key, other_key = key(), key()
    ca = cert(name("tidemark test CA"), ca_key, name("tidemark test CA"), ca_key, ca=True)
    other = cert(name("other CA"), other_key, name("other CA"), other_key, ca=True)
    server_dir = os.path.join(out, "server")
    os.makedirs(server_dir)
    sk = key()
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    write(os.path.join(server_dir, "ca-cert.pem"), pem_cert(ca))
    write(os.path.join(server_dir, "server-cert.pem"),
          pem_cert(cert(name("localhost"), sk, ca.subject, ca_key,
                        usage=ExtendedKeyUsageOID.SERVER_AUTH, san=san)))
    write(os.path.join(server_dir, "server-key.pem"), pem_key(sk))
    clients = {
        "admin": ("admin", ca, ca_key, None),
        "scoped": ("backup-host-1", ca, ca_key, None),
        "stranger": ("stranger", ca, ca_key, None),
        "otherca": ("admin", other, other_key, None),
        "expired": ("admin", ca, ca_key, (NOW - 10 * DAY, NOW - DAY)),
        "nocert": None,
    }
    for client, spec in clients.items():
        d = os.path.join(out, client)
        os.makedirs(d)
        write(os.path.join(d, "ca-cert.pem"), pem_cert(ca))
        if spec is None:
            continue
        cn, issuer, issuer_key, dates = spec
        ck = key()
        start, end = dates or (None, None)
        c = cert(name(cn), ck, issuer.subject, issuer_key,
                 usage=ExtendedKeyUsageOID.CLIENT_AUTH, start=start, end=end)
        write(os.path.join(d, "client-cert.pem"), pem_cert(c))
        write(os.path.join(d, "client-key.pem"), pem_key(ck))
        print(f"{client}\t{c.subject.rfc4514_string()}")


if __name__ == "__main__":
    main(sys.argv[1])
