# -*- test-case-name: tests.test_http_forms,tests.test_http_forms_site -*-
"""
casd's logon page: plain HTML that works without JavaScript, with labelled fields and the
public/private computer choice.  Operators restyle it by replacing L{TEMPLATE} (the placeholders
are C{str.format} fields; every value is HTML-escaped before it is inserted).
"""

from __future__ import annotations

from html import escape

TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>Sign in - {title}</title>
<style>
body {{ font-family: system-ui, sans-serif; background: #f3f4f6; margin: 0; }}
main {{ max-width: 24rem; margin: 4rem auto; background: #fff; padding: 2rem; border-radius: 6px;
        box-shadow: 0 1px 3px rgba(0,0,0,.2); }}
label {{ display: block; margin: .8rem 0 .2rem; }}
input[type=text], input[type=password] {{ width: 100%; box-sizing: border-box; padding: .5rem; }}
fieldset {{ border: none; padding: 0; margin: 1rem 0; }}
fieldset label {{ display: inline; margin: 0 0 0 .3rem; }}
.message {{ background: #fde8e8; padding: .6rem; border-radius: 4px; }}
.note {{ color: #555; font-size: .85rem; }}
button {{ padding: .5rem 1.5rem; }}
</style>
</head>
<body>
<main>
<h1>{title}</h1>
{message}
<form method="post" action="{action}">
<input type="hidden" name="csrf" value="{csrf}">
<input type="hidden" name="url" value="{url}">
<label for="username">User name</label>
<input type="text" id="username" name="username" value="{username}" autocomplete="username"
       autocapitalize="none" spellcheck="false" required autofocus>
<label for="password">Password</label>
<input type="password" id="password" name="password" autocomplete="current-password" required>
{choice}
<p><button type="submit" id="signin">Sign in</button></p>
</form>
</main>
</body>
</html>
"""

CHOICE = """<fieldset>
<legend>Security</legend>
<p><input type="radio" id="public" name="security" value="public"{publicChecked}>
<label for="public">This is a public or shared computer</label></p>
<p><input type="radio" id="private" name="security" value="private"{privateChecked}>
<label for="private">This is a private computer</label></p>
<p class="note">On a public computer you are signed out after {publicMinutes} minutes without
activity; on a private computer after {privateHours} hours.</p>
</fieldset>"""

#: The messages the page can show, by the C{reason} of the logon URL (no client text is echoed).
MESSAGES = {
    "expired": "Your session has ended. Please sign in again.",
    "loggedoff": "You have signed out.",
    "failed": "The user name or password is incorrect.",
    "retry": "The sign-in form had expired. Please try again.",
    "unavailable": "Sign-in is temporarily unavailable. Please try again in a few minutes.",
    "throttled": "Too many attempts. Please wait a moment and try again.",
}


def renderLogonPage(
    *,
    title: str,
    action: str,
    csrf: str,
    url: str,
    username: str = "",
    reason: str = "",
    offerChoice: bool = True,
    public: bool = True,
    publicTimeout: float = 900,
    privateTimeout: float = 28800,
) -> bytes:
    """
    @param reason: a key of L{MESSAGES}, or C{''}; anything else shows no message.
    @return: the page, UTF-8.
    """
    text = MESSAGES.get(reason, "")
    message = f'<p class="message" role="alert">{escape(text)}</p>' if text else ""
    choice = ""
    if offerChoice:
        choice = CHOICE.format(
            publicChecked=" checked" if public else "",
            privateChecked="" if public else " checked",
            publicMinutes=f"{publicTimeout / 60:g}",
            privateHours=f"{privateTimeout / 3600:g}",
        )
    return TEMPLATE.format(
        title=escape(title),
        message=message,
        action=escape(action),
        csrf=escape(csrf),
        url=escape(url),
        username=escape(username),
        choice=choice,
    ).encode("utf-8")
