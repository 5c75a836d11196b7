"""
L{casd.config.settings.Values}: a frozen bag of settings whose values are plain attributes.
"""

import copy
import pickle

import attr

from twisted.trial.unittest import SynchronousTestCase

from casd.config.settings import Values


class ValuesTests(SynchronousTestCase):
    def test_attributes(self):
        values = Values({"max_line_length": 8192, "idle_timeout": 1800.0})
        self.assertEqual(values.max_line_length, 8192)
        self.assertEqual(getattr(values, "idle_timeout"), 1800.0)
        self.assertEqual(values.asDict(), {"max_line_length": 8192, "idle_timeout": 1800.0})

    def test_plainAttributes(self):
        """
        A value is read without a Python call (the hot path of a session reads several).
        """
        values = Values({"reply_timeout": 6.0})
        self.assertEqual(vars(values)["reply_timeout"], 6.0)

    def test_unknown(self):
        values = Values({"a": 1})
        self.assertRaises(AttributeError, getattr, values, "b")
        self.assertFalse(hasattr(values, "b"))
        self.assertEqual(getattr(values, "b", 2), 2)

    def test_frozen(self):
        values = Values({"a": 1})
        self.assertRaises(attr.exceptions.FrozenInstanceError, setattr, values, "a", 2)
        self.assertRaises(attr.exceptions.FrozenInstanceError, setattr, values, "b", 2)
        self.assertEqual(values.a, 1)

    def test_equalityAndCopies(self):
        values = Values({"a": 1, "b": [2]})
        self.assertEqual(values, Values({"b": [2], "a": 1}))
        self.assertNotEqual(values, Values({"a": 2, "b": [2]}))
        self.assertEqual(copy.deepcopy(values), values)
        self.assertEqual(pickle.loads(pickle.dumps(values)).b, [2])
        self.assertEqual(repr(Values({"a": 1})), "Values({'a': 1})")


class ProtocolSectionTests(SynchronousTestCase):
    def test_valuesAsAttributes(self):
        from casd.config import ProtocolSection

        section = ProtocolSection("imap", True, (), Values({"idle_timeout": 60.0, "enabled": False}))
        self.assertEqual(section.idle_timeout, 60.0)
        self.assertEqual(vars(section)["idle_timeout"], 60.0)  # a plain attribute
        self.assertIs(section.enabled, True)  # the field, not the value of the same name
        self.assertRaises(AttributeError, getattr, section, "nothing")
        self.assertEqual(getattr(section, "max_sessions_per_user", 0), 0)
        self.assertRaises(attr.exceptions.FrozenInstanceError, setattr, section, "idle_timeout", 1)
        self.assertEqual(section, ProtocolSection("imap", True, (), Values({"idle_timeout": 60.0, "enabled": False})))
