"""
A private Roundcube (Debian C{roundcube-core} + C{roundcube-sqlite3}) served by C{php -S} on
C{127.0.0.1}, reading mail from a private Dovecot, for the browser tests of casd's forms login.

Nothing of the system installation is changed: the fixture builds its own application root of
symbolic links to C{/usr/share/roundcube} (Roundcube takes its root from the real path of
C{public_html/index.php}, so that one small file is copied), with a private configuration, SQLite
database, logs, temporary files and plugin directory.

Single sign-on: the plugin C{casd_sso} (written here) logs the user named by the trusted
C{X-Remote-User} header in, and Roundcube opens the mailbox as that user through a Dovecot master
user (C{imap_auth_cid}, SASL PLAIN with the user as authorisation identity), so no password
reaches Roundcube.  Only casd can reach this port, and casd always strips the header from client
requests.  Roundcube's own logout leads to casd's logoff (C{logoffURL}).
"""

import os
import shutil

from .procs import ServerProcess, freePort, requireBinary

ROUNDCUBE = "/usr/share/roundcube"
PUBLIC_INDEX = "/var/lib/roundcube/public_html/index.php"

SSO_PLUGIN = r"""<?php
/**
 * casd single sign-on for the tests: trust X-Remote-User, set only by casd.
 */
class casd_sso extends rcube_plugin
{
    public function init()
    {
        $this->add_hook('startup', [$this, 'startup']);
        $this->add_hook('authenticate', [$this, 'authenticate']);
        $this->add_hook('logout_after', [$this, 'logout_after']);
    }

    private function remoteUser()
    {
        return isset($_SERVER['HTTP_X_REMOTE_USER']) ? trim($_SERVER['HTTP_X_REMOTE_USER']) : '';
    }

    public function startup($args)
    {
        $rcmail = rcmail::get_instance();
        $user = $this->remoteUser();
        if ($user === '') {
            return $args;
        }
        if (!empty($_SESSION['user_id']) && $rcmail->get_user_name() !== $user) {
            $rcmail->kill_session();
        }
        if (empty($_SESSION['user_id']) && $args['task'] !== 'logout') {
            $args['task'] = 'login';
            $args['action'] = 'login';
        }
        return $args;
    }

    public function authenticate($args)
    {
        $user = $this->remoteUser();
        if ($user !== '') {
            $args['user'] = $user;
            $args['pass'] = 'by-master-user';
            $args['cookiecheck'] = false;
            $args['valid'] = true;
        }
        return $args;
    }

    public function logout_after($args)
    {
        $url = rcmail::get_instance()->config->get('casd_logoff_url');
        if ($url) {
            header('Location: ' . $url);
            exit;
        }
        return $args;
    }
}
"""


def _php(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_php(v) for v in value) + "]"
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


class Roundcube(ServerProcess):
    """
    @ivar port: the HTTP port of C{php -S}.
    @ivar pid: the PHP server's process ID while running.
    """

    host = "127.0.0.1"

    def __init__(self, directory, imapPort, masterUser, masterPassword, logoffURL="", prefix=""):
        """
        @param prefix: the URL path Roundcube is published under (C{/owa}), as when a front end
            forwards paths unchanged; empty for the root.
        @param imapPort: the private Dovecot's plain IMAP port on 127.0.0.1.
        @param masterUser: a Dovecot master user (L{tests.support.dovecot.Dovecot} C{masterUsers}).
        @param logoffURL: where Roundcube's own logout sends the browser (casd's logoff page).
        """
        self.directory = os.path.abspath(directory)
        self.imapPort = imapPort
        self.masterUser = masterUser
        self.masterPassword = masterPassword
        self.logoffURL = logoffURL
        self.prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
        self.docroot = os.path.join(self.directory, "docroot")
        self.root = os.path.join(self.directory, "app")
        self.configDir = os.path.join(self.directory, "config")
        self.logPath = os.path.join(self.directory, "php.log")
        self.port = None
        self.pid = None
        self._process = None

    @property
    def url(self):
        return "http://%s:%d%s/" % (self.host, self.port, self.prefix)

    def _build(self):
        for path in (ROUNDCUBE, PUBLIC_INDEX, os.path.join(ROUNDCUBE, "skins", "elastic")):
            if not os.path.exists(path):
                raise RuntimeError(
                    "%s missing: apt-get install roundcube-core roundcube-sqlite3" % (path,))
        root = self.root
        os.makedirs(os.path.join(root, "public_html", "program"), exist_ok=True)
        for name in ("index.php", "program", "SQL", "skins"):
            os.symlink(os.path.join(ROUNDCUBE, name), os.path.join(root, name))
        os.symlink(self.configDir, os.path.join(root, "config"))
        plugins = os.path.join(root, "plugins")
        os.makedirs(os.path.join(plugins, "casd_sso"))
        for name in ("jqueryui", "filesystem_attachments"):
            if os.path.isdir(os.path.join(ROUNDCUBE, "plugins", name)):
                os.symlink(os.path.join(ROUNDCUBE, "plugins", name), os.path.join(plugins, name))
        with open(os.path.join(plugins, "casd_sso", "casd_sso.php"), "w") as f:
            f.write(SSO_PLUGIN)
        public = os.path.join(root, "public_html")
        shutil.copy(PUBLIC_INDEX, os.path.join(public, "index.php"))
        os.symlink("../plugins", os.path.join(public, "plugins"))
        os.symlink("../skins", os.path.join(public, "skins"))
        for name in ("js", "resources"):
            os.symlink("../../program/" + name, os.path.join(public, "program", name))
        # PHP resolves __DIR__ through symbolic links, so Roundcube finds its root from here too.
        published = os.path.join(self.docroot, self.prefix.lstrip("/")) if self.prefix else self.docroot
        os.makedirs(os.path.dirname(published.rstrip("/")), exist_ok=True)
        os.symlink(public, published.rstrip("/"))
        for name in ("logs", "temp"):
            os.makedirs(os.path.join(self.directory, name), exist_ok=True)
        os.makedirs(self.configDir, exist_ok=True)
        for name in ("defaults.inc.php", "mimetypes.php"):
            shutil.copy(os.path.join("/etc/roundcube", name), os.path.join(self.configDir, name))
        settings = {
            "db_dsnw": "sqlite:///%s?mode=0640" % (os.path.join(self.directory, "rc.db"),),
            "imap_host": "127.0.0.1:%d" % (self.imapPort,),
            "imap_auth_type": "PLAIN",
            "imap_auth_cid": self.masterUser,
            "imap_auth_pw": self.masterPassword,
            "smtp_host": "",
            "temp_dir": os.path.join(self.directory, "temp") + "/",
            "log_dir": os.path.join(self.directory, "logs") + "/",
            "des_key": os.urandom(12).hex(),
            "plugins": ["casd_sso"],
            "skin": "elastic",
            "enable_spellcheck": False,
            "product_name": "Roundcube behind casd",
            "casd_logoff_url": self.logoffURL,
            "session_lifetime": 60,
            "use_https": False,
        }
        with open(os.path.join(self.configDir, "config.inc.php"), "w") as f:
            f.write("<?php\n$config = [];\n")
            for key, value in settings.items():
                f.write("$config[%s] = %s;\n" % (_php(key), _php(value)))

    def start(self, timeout=20.0):
        php = requireBinary("php", [("/usr/bin/php", "php-cli")])
        self._build()
        self.port = freePort()
        # Several workers: a browser loads assets and the message list in parallel.
        env = dict(os.environ, ROUNDCUBE_CONFIG_DIR=self.configDir, PHP_CLI_SERVER_WORKERS="4")
        return self.launch([php, "-S", "%s:%d" % (self.host, self.port), "-t", self.docroot], env, 'php -S', timeout)

    def logText(self):
        text = ""
        for path in (self.logPath, os.path.join(self.directory, "logs", "errors.log")):
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    text += f.read()
            except FileNotFoundError:
                pass
        return text
