// Command buildrecipe reads xcaddy.json, the build recipe, and prints the
// arguments of `go tool xcaddy` that build it, so the Justfile and CI take the
// Caddy and plugin versions from one place:
//
//	go tool xcaddy $(go run ./internal/buildrecipe)
//
// With -output it prints only the path of the built binary.
package main

import (
	"flag"
	"fmt"
	"os"
	"strings"
)

func main() {
	file := flag.String("file", "xcaddy.json", "the build recipe")
	output := flag.Bool("output", false, "print only the path of the built binary")
	flag.Parse()
	if flag.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "buildrecipe: unexpected arguments %q\n", flag.Args())
		os.Exit(2)
	}
	r, err := Load(*file)
	if err != nil {
		fmt.Fprintln(os.Stderr, "buildrecipe:", err)
		os.Exit(1)
	}
	if *output {
		fmt.Println(r.Output)
		return
	}
	fmt.Println(strings.Join(r.Args(), " "))
}
