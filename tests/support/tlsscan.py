"""
Scan TLS listeners with sslyze and print what tests/integration/test_tls_scan.py checks, as JSON.

Runs under the scanner's own venv (C{.venv-sslyze}, made by C{./run tests}: sslyze pins an older
cryptography than casd's), never imported by casd's tests:

    .venv-sslyze/bin/python tests/support/tlsscan.py REQUEST.json

REQUEST: C{{"caFile": PATH, "targets": [{"name", "host", "port", "serverName", "starttls"}]}},
C{starttls} one of sslyze's dialects (C{"IMAP"}, C{"POP3"}, C{"SMTP"}) or C{null} for implicit
TLS.  Output: name -> C{{"error", "intermediate", "versions", "renegotiation", "resumption"}}:
the Mozilla "intermediate" issues (empty when compliant), the TLS versions accepted, the
renegotiation findings and the TLS 1.2 resumption results.
"""

import json
import sys
from pathlib import Path

from sslyze import (
    CertificateInfoExtraArgument,
    ProtocolWithOpportunisticTlsEnum,
    Scanner,
    ScanCommand,
    ScanCommandsExtraArguments,
    ServerNetworkConfiguration,
    ServerNetworkLocation,
    ServerScanRequest,
    ServerScanStatusEnum,
)
from sslyze.mozilla_tls_profile.tls_config_checker import (
    SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
    MozillaTlsConfiguration,
    ServerNotCompliantWithTlsConfiguration,
    ServerScanResultIncomplete,
    TlsConfigurationEnum,
    check_server_against_tls_configuration,
)

VERSIONS = {
    "SSLv2": "ssl_2_0_cipher_suites",
    "SSLv3": "ssl_3_0_cipher_suites",
    "TLSv1.0": "tls_1_0_cipher_suites",
    "TLSv1.1": "tls_1_1_cipher_suites",
    "TLSv1.2": "tls_1_2_cipher_suites",
    "TLSv1.3": "tls_1_3_cipher_suites",
}


def main(path: str) -> None:
    request = json.loads(Path(path).read_text())
    extra = ScanCommandsExtraArguments(
        certificate_info=CertificateInfoExtraArgument(custom_ca_file=Path(request["caFile"]))
    )
    commands = set(SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER) | {ScanCommand.SESSION_RESUMPTION}
    names = {}
    scanner = Scanner(concurrent_server_scans_limit=len(request["targets"]))
    scans = []
    for target in request["targets"]:
        starttls = target.get("starttls")
        location = ServerNetworkLocation(target["host"], target["port"], ip_address=target["host"])
        network = ServerNetworkConfiguration(
            tls_server_name_indication=target["serverName"],
            tls_opportunistic_encryption=ProtocolWithOpportunisticTlsEnum(starttls) if starttls else None,
            # Generous: the machine running the suite may be busy; a slow answer is not a finding.
            network_timeout=20,
            network_max_retries=4,
        )
        names[(target["host"], target["port"])] = target["name"]
        scans.append(
            ServerScanRequest(
                server_location=location,
                network_configuration=network,
                scan_commands=commands,
                scan_commands_extra_arguments=extra,
            )
        )
    scanner.queue_scans(scans)
    intermediate = MozillaTlsConfiguration.get(TlsConfigurationEnum.MOZILLA_INTERMEDIATE)
    out = {}
    for result in scanner.get_results():
        name = names[(result.server_location.hostname, result.server_location.port)]
        entry = out[name] = {"error": None}
        if result.scan_status != ServerScanStatusEnum.COMPLETED:
            entry["error"] = f"{result.scan_status.value}: {result.connectivity_error_trace}"
            continue
        try:
            check_server_against_tls_configuration(result, intermediate)
            entry["intermediate"] = {}
        except ServerNotCompliantWithTlsConfiguration as e:
            entry["intermediate"] = dict(e.issues)
        except ServerScanResultIncomplete as e:
            entry["intermediate"] = {"incomplete": str(e)}
        scan = result.scan_result
        for command in commands:
            attempt = getattr(scan, command.value)
            if attempt.status.value != "COMPLETED":
                trace = attempt.error_trace
                entry.setdefault("failed", {})[command.value] = (
                    f"{attempt.error_reason}: " + "".join(list(trace.format())[-3:]) if trace else str(attempt.error_reason)
                )
        entry["versions"] = sorted(
            version
            for version, attribute in VERSIONS.items()
            if getattr(scan, attribute).result is not None
            and getattr(scan, attribute).result.is_tls_version_supported
        )
        renegotiation = scan.session_renegotiation.result
        entry["renegotiation"] = renegotiation and {
            "secure": renegotiation.supports_secure_renegotiation,
            "clientInitiatedDoS": renegotiation.is_vulnerable_to_client_renegotiation_dos,
        }
        resumption = scan.session_resumption.result
        entry["resumption"] = resumption and {
            "sessionId": resumption.session_id_resumption_result.value,
            "ticket": resumption.tls_ticket_resumption_result.value,
        }
    json.dump(out, sys.stdout, indent=1, sort_keys=True)


if __name__ == "__main__":
    main(sys.argv[1])
