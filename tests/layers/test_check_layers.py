"""Tests of the layer checker on fixture crates written to a temporary folder.

    python3 -B -m unittest discover -s tests/layers -p 'test_*.py'     (make test runs it)
"""
import contextlib
import io
import os
import tempfile
import textwrap
import unittest

import check_layers

MAP = """
[crates.fix]
src = "fix/src"
layers = [
  { name = "top", modules = ["hooks"] },
  { name = "middle", modules = ["policy"] },
  { name = "bottom", modules = ["sys"] },
]
"""


class Fixture:
    """A crate `fix` (lib.rs, hooks.rs, policy.rs, sys.rs, sys/clock.rs) and a layer map."""

    def __init__(self, files, layer_map=MAP):
        self.dir = tempfile.TemporaryDirectory()
        self.root = self.dir.name
        base = {
            "lib.rs": "mod hooks;\nmod policy;\nmod sys;\n",
            "hooks.rs": "use crate::policy::decide;\n",
            "policy.rs": "pub fn decide() { crate::sys::clock::now(); }\n",
            "sys.rs": "pub mod clock;\n",
            "sys/clock.rs": "pub fn now() {}\n",
        }
        base.update(files)
        for rel, text in base.items():
            path = os.path.join(self.root, "fix/src", rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(textwrap.dedent(text))
        with open(os.path.join(self.root, "layers.toml"), "w") as f:
            f.write(layer_map)

    def run(self):
        """(exit status, stdout, stderr) of the checker on this fixture."""
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = check_layers.main(["--root", self.root, "--map", "layers.toml"])
        self.dir.cleanup()
        return rc, out.getvalue(), err.getvalue()


class LayerCheck(unittest.TestCase):
    def test_downward_imports_pass(self):
        rc, out, err = Fixture({}).run()
        self.assertEqual(rc, 0, err)
        self.assertIn("no new upward import", out)

    def test_upward_import_and_the_cycle_it_makes_fail_with_file_line_and_rule(self):
        rc, _, err = Fixture({"sys/clock.rs": "pub fn now() {}\n\nfn f() { crate::policy::decide(); }\n"}).run()
        self.assertEqual(rc, 1)
        self.assertIn("fix/src/sys/clock.rs:3: upward import sys::clock -> policy (bottom is below "
                      "middle) in crate fix (rule: a module imports only from its own layer", err)
        self.assertIn("cycle between layers of crate fix: bottom -> middle (fix/src/sys/clock.rs:3), "
                      "middle -> bottom (fix/src/policy.rs:1)", err)

    def test_use_groups_super_and_self_paths_count(self):
        cases = {
            "use crate::{policy, hooks::x};": "sys -> hooks",
            "use crate::{hooks::{a, b as c}};": "sys -> hooks",
            "use super::policy::decide;": "sys -> policy",
            "use self::clock::now;\nuse super::hooks as h;": "sys -> hooks",
        }
        for text, edge in cases.items():
            with self.subTest(text=text):
                rc, _, err = Fixture({"sys.rs": "pub mod clock;\n" + text + "\n"}).run()
                self.assertEqual(rc, 1)
                self.assertIn(f"upward import {edge} ", err)

    def test_comments_strings_and_inline_test_modules_do_not_count_as_upward(self):
        text = """
            pub mod clock;
            // crate::hooks::x in a comment
            /* crate::policy::decide() /* nested */ crate::hooks */
            /// [`crate::hooks`] in a doc comment
            const S: &str = "crate::hooks::x";
            const R: &str = r#"crate::policy::y "quoted""#;
            const C: char = '"';
            fn f<'a>(x: &'a str) -> &'a str { x }
            #[cfg(test)]
            mod tests {
                use super::*;
                use super::clock::now;
            }
            """
        rc, out, err = Fixture({"sys.rs": text}).run()
        self.assertEqual(rc, 0, err)
        self.assertIn("no new upward import", out)

    def test_allowlisted_import_passes_and_an_unneeded_entry_is_reported(self):
        layer_map = MAP + """allow = [
  { from = "sys::clock", to = "policy", why = "fixture" },
  { from = "sys", to = "hooks", why = "no longer true" },
]
"""
        rc, out, err = Fixture({"sys/clock.rs": "use crate::policy::decide;\n"}, layer_map).run()
        self.assertEqual(rc, 0, err)
        self.assertIn("(2 allowlisted)", out)
        self.assertIn("allowlist entry sys -> hooks is no longer needed", err)
        self.assertNotIn("sys::clock -> policy is no longer needed", err)

    def test_a_module_in_no_layer_fails(self):
        rc, _, err = Fixture({"lib.rs": "mod hooks;\nmod policy;\nmod sys;\nmod stray;\n", "stray.rs": ""}).run()
        self.assertEqual(rc, 1)
        self.assertIn("fix/src/stray.rs:1: module fix::stray is in no layer", err)

    def test_a_folder_is_a_layer_and_a_list_cannot_place_its_files_elsewhere(self):
        folders = MAP.replace('modules = ["hooks"]', 'folder = "hooks"').replace('modules = ["sys"]', 'folder = "sys"')
        files = {"hooks.rs": "pub mod entry;\n", "hooks/entry.rs": "use crate::policy::decide;\n"}
        rc, _out, err = Fixture(files, folders).run()
        self.assertEqual(rc, 0, err)
        upward = {"sys/clock.rs": "pub fn now() { crate::hooks::entry::go(); }\n"}
        rc, _out, err = Fixture({**files, **upward}, folders).run()
        self.assertEqual(rc, 1)
        self.assertIn("fix/src/sys/clock.rs:1: upward import sys::clock -> hooks::entry (bottom is below top)", err)
        misplaced = folders.replace('modules = ["policy"]', 'modules = ["policy", "sys::clock"]')
        rc, _out, err = Fixture(files, misplaced).run()
        self.assertEqual(rc, 1)
        self.assertIn("lists sys::clock in layer middle, but it lives in the folder of layer bottom", err)

    def test_the_repository_passes_its_own_map(self):
        root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = check_layers.main(["--root", root])
        self.assertEqual(rc, 0, err.getvalue())


if __name__ == "__main__":
    unittest.main()
